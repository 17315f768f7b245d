"""Every contract between services, in one place, imported by both sides (docs/contracts.md).

- :mod:`shared.contracts.tasks`: Celery task names, queues (``training_queue(site)``) and time limits;
- :mod:`shared.contracts.layout`: object-storage keys (federated runs, inference outputs, Triton repository);
- :mod:`shared.contracts.codec`: weights on the wire (state dict <-> bytes);
- :mod:`shared.contracts.messages`: proto messages <-> JSON dicts, with one set of options;
- :mod:`shared.contracts.artifacts`: the artifact names of a registered model version in MLflow.

Contracts that already had a single home stay there and are referenced from here: the dataset manifest
(``shared.datasets``: ``datasets/{version}/manifest.json``), the preprocessing cache keys
(``shared.datasets.cache``) and the training config (``shared.training.TrainingConfig``).
Why one module: a name written twice drifts; a queue that is a setting on one side and a literal on the other
silently strands tasks.
"""
