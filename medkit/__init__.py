"""medkit: the helper package of the medkit course (data → SFT → DPO → QLoRA → CoT → RAG →
agent → benchmarking → serving). Notebooks teach; this package holds the logic."""
__version__ = "0.1.0"

# The one notice every user-facing answer carries (agent, RAG answers, the serving API, model
# cards, benchmark ledgers): one wording, so a demo never shows two.
NOT_MEDICAL_ADVICE = ("This is general information from an educational demo, not medical advice: it cannot "
                      "replace a doctor, nurse or pharmacist who knows you. In an emergency call your local "
                      "emergency number.")


def _quiet_optional_kernel_warning() -> None:
    """bitsandbytes (0.50) on a CPU with AVX512-BF16 tries to fetch an optional fused 4-bit kernel
    from the Hugging Face hub through the ``kernels`` package, and when that package is absent it
    logs a warning telling the reader to install it. The course runs offline on bitsandbytes' own
    CPU path, so on those machines every notebook that loads a model printed advice a learner
    should not follow. Only that one message is dropped."""
    import logging

    class _DropKernelsHint(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "from kernels-community" not in record.getMessage()

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsHint())


_quiet_optional_kernel_warning()
