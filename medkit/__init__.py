"""medkit: the helper package of the medkit course (data → SFT → DPO → QLoRA → CoT → RAG →
agent → benchmarking → serving). Notebooks teach; this package holds the logic."""
__version__ = "0.1.0"

# The one notice every user-facing answer carries (agent, RAG answers, the serving API, model
# cards, benchmark ledgers): one wording, so a demo never shows two.
NOT_MEDICAL_ADVICE = ("This is general information from an educational demo, not medical advice: it cannot "
                      "replace a doctor, nurse or pharmacist who knows you. In an emergency call your local "
                      "emergency number.")
