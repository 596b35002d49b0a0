"""medkit: the helper package of the medkit course (data → SFT → DPO → QLoRA → CoT → RAG →
agent → benchmarking → serving). Notebooks teach; this package holds the logic."""
__version__ = "0.1.0"

NOT_MEDICAL_ADVICE = ("This is an educational demo, not medical advice. Talk to a qualified "
                      "clinician about your own health; in an emergency call your local emergency number.")
