from shared.db.migration_env import run

run()
