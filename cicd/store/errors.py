"""The store's errors under the store's names, so callers catch them without importing SQLAlchemy.

DatabaseError: the database could not do it now (locked, restarting, unreachable): worth a retry.
StoreError: any failure to read or write the store, DatabaseError included.
"""
from sqlalchemy.exc import OperationalError as DatabaseError
from sqlalchemy.exc import SQLAlchemyError as StoreError

__all__ = ["DatabaseError", "StoreError"]
