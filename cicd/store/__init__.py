"""The store: the tables, the transactions and sessions over them, and the proof chain.

`from cicd.store import Incident, transaction` is the one way in; cicd.store.proof (the hash
chain), cicd.store.deadletters and cicd.store.reports (the read views) sit beside it.
"""
from cicd.store.db import (PROOF_CLOCK, PROOF_PENDING, app_row, connection_of, dispose_engines, engine_for, get_app,
                           incident_row, session_scope, transaction, update_incident)
from cicd.store.models import (App, AppHealth, Approval, Base, DeadLetter, DeployLock, Execution, Incident,
                               PlacedReplicas, PolicyValue, ProofHead, ProofRecord, Release, ReplicaHealth,
                               SimAppState)

__all__ = ["PROOF_CLOCK", "PROOF_PENDING", "app_row", "connection_of", "dispose_engines", "engine_for", "get_app",
           "incident_row", "session_scope", "transaction", "update_incident", "App", "AppHealth", "Approval", "Base",
           "DeadLetter", "DeployLock", "Execution", "Incident", "PlacedReplicas", "PolicyValue", "ProofHead",
           "ProofRecord", "Release", "ReplicaHealth", "SimAppState"]
