"""The medical agent of notebook 07: memory, triage, retrieval, Draft → Medical Auditor →
Refine, tools, a safety validator and a SQLite store.

    from medkit.agent import MedicalAgent
    agent = MedicalAgent.from_session(session)
    reply = agent.chat("I'm allergic to penicillin. What helps tonsillitis?", patient_id="p1")
    reply.to_dict()
"""
from .agent import MedicalAgent, Reply
from .safety import validate

__all__ = ["MedicalAgent", "Reply", "validate"]
