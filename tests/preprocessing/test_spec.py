"""PreprocessingSpec: YAML loading, the hash of the deterministic part, and clear errors for bad specs."""

from __future__ import annotations

import copy

import pytest

from shared.preprocessing import PreprocessingSpec, SpecError, build_transforms, list_specs, load_spec

MINIMAL = """
name: t
modality: mr
deterministic:
  - name: Orientationd
    args: {axcodes: RAS}
  - name: NormalizeIntensityd
    args: {nonzero: true}
augmentation:
  - name: RandFlipd
    args: {prob: 0.5, spatial_axis: [0]}
"""


def test_builtin_specs_load_and_build_every_stage() -> None:
    names = list_specs()
    assert {"mr_hippocampus", "ct_abdomen", "ct_lung", "mr_brain"} <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.name == name
        assert len(spec.hash) == 64
        for stage in ("preprocess", "augment", "inference"):
            assert build_transforms(spec, stage).transforms  # type: ignore[arg-type]
    assert load_spec("mr_brain").deterministic[0].name == "N4BiasFieldCorrectiond"
    assert load_spec("ct_lung").deterministic[2].args == {"preset": "lung"}


def test_hash_covers_deterministic_steps_only() -> None:
    spec = PreprocessingSpec.from_yaml(MINIMAL)
    assert spec.modality == "MR"
    data = spec.to_dict()
    assert data["hash"] == spec.hash
    assert PreprocessingSpec.from_dict(data) == spec

    more_augmentation = copy.deepcopy(data)
    del more_augmentation["hash"]
    more_augmentation["augmentation"].append({"name": "RandGaussianNoised", "args": {"prob": 0.1}})
    more_augmentation["name"] = "renamed"
    assert PreprocessingSpec.from_dict(more_augmentation).hash == spec.hash

    other_steps = copy.deepcopy(data)
    del other_steps["hash"]
    other_steps["deterministic"][1]["args"]["nonzero"] = False
    assert PreprocessingSpec.from_dict(other_steps).hash != spec.hash

    # key order in the YAML does not matter: the hash is over canonical JSON
    reordered = MINIMAL.replace("{nonzero: true}", "{nonzero: true, channel_wise: false}")
    reordered_2 = MINIMAL.replace("{nonzero: true}", "{channel_wise: false, nonzero: true}")
    assert PreprocessingSpec.from_yaml(reordered).hash == PreprocessingSpec.from_yaml(reordered_2).hash


def test_stored_hash_must_match() -> None:
    data = PreprocessingSpec.from_yaml(MINIMAL).to_dict()
    data["deterministic"][1]["args"]["nonzero"] = False  # edited after it was stored
    with pytest.raises(SpecError, match="does not match"):
        PreprocessingSpec.from_dict(data)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("{name: Spacingdd, args: {}}", "unknown transform 'Spacingdd'"),
        ("{name: Spacing, args: {pixdim: [1, 1, 1]}}", "not a dictionary transform"),
        ("{name: Spacingd, args: {pixdimm: [1, 1, 1]}}", r"deterministic\[2\] Spacingd: invalid arguments"),
        ("{name: RandFlipd, args: {prob: 1.0}}", "random transforms belong in 'augmentation'"),
        ("{name: Spacingd, args: {keys: [image], pixdim: [1, 1, 1]}}", "set by build_transforms"),
        ("{name: LoadImaged, args: {}}", "added by build_transforms itself"),
        ("{name: CTWindowd, args: {preset: liver}}", "unknown preset 'liver'"),
    ],
)
def test_bad_steps_fail_at_load_with_the_step_named(step: str, message: str) -> None:
    text = MINIMAL.replace("augmentation:", f"  - {step}\naugmentation:")
    with pytest.raises(SpecError, match=message):
        PreprocessingSpec.from_yaml(text, source="bad.yaml")


def test_malformed_documents() -> None:
    with pytest.raises(SpecError, match="YAML mapping"):
        PreprocessingSpec.from_yaml("- just\n- a list\n")
    with pytest.raises(SpecError, match="invalid spec"):
        PreprocessingSpec.from_yaml("name: x\nmodality: CT\n")  # no deterministic steps
    with pytest.raises(SpecError, match="invalid spec"):
        PreprocessingSpec.from_yaml(MINIMAL + "colour: blue\n")
    with pytest.raises(SpecError, match="no built-in preprocessing spec 'nope'"):
        load_spec("nope")
    with pytest.raises(SpecError, match="unknown stage"):
        build_transforms(PreprocessingSpec.from_yaml(MINIMAL), "train")  # type: ignore[arg-type]
