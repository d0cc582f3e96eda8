from importlib import resources

# The service's schema, handed to the migration runner (shared/db.py knows no service by name).
MIGRATIONS = resources.files(__name__) / "migrations"
