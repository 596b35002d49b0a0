"""LLM-assisted drafting, refining and summarising (``agent.mode: llm``: the GPU profiles and ``smol``).

The LLM writes; the rule-based Medical Auditor (``medkit.agent.auditor``) still checks every
draft, and the refine prompt hands the model the auditor's structured critique. The tiny
profile does not use this module: its tiny models cannot write usable answers.
"""
from __future__ import annotations

import json
from typing import Any

SYSTEM = ("You are a careful medical assistant. Answer only from the numbered evidence, cite it as [E1], [E2] "
          "after each claim, never invent doses, and say when something needs a doctor.")


class LLMWriter:
    """The agent's writer: ``model_ref`` on ``runtime`` (``transformers`` or ``llama.cpp``, see
    :mod:`medkit.serve.runtime`), one greedy reply at a time."""

    def __init__(self, model_ref: str, session=None, dtype: str = "bfloat16", device: str = "cuda",
                 max_new_tokens: int = 256, runtime: str = "transformers"):
        from ..serve.runtime import open_chat

        self.chat = open_chat(model_ref, session, runtime, dtype, device)
        self.max_new_tokens = max_new_tokens

    def _generate(self, msgs: list[dict[str, str]]) -> str:
        return self.chat.generate([msgs], max_new_tokens=self.max_new_tokens)[0]["text"].strip()

    def _ask(self, user: str) -> str:
        return self._generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])

    @staticmethod
    def _evidence(evidence: list[dict[str, str]]) -> str:
        return "\n".join(f"[E{n}] {e['text']}" for n, e in enumerate(evidence, 1))

    @staticmethod
    def draft_messages(message: str, memory: dict[str, Any], summary: str,
                       evidence: list[dict[str, str]]) -> list[dict[str, str]]:
        """06's own evidence prompt (``rag.answer.build_messages``), the format that 02's grounded
        rows and 03's citation pairs train on, with what the agent knows about the patient after
        the question. (An agent-only prompt, "Patient: ... Answer in 2-4 sentences with
        citations", made the SmolLM2 DPO model repeat the patient's message back: run smol-full.)"""
        from ..rag import answer

        ev = [answer.Evidence(f"E{n}", e.get("id", ""), e["text"], 1.0) for n, e in enumerate(evidence, 1)]
        known = f"(Known about the patient: {json.dumps(memory)}. Earlier in this conversation: {summary or 'nothing'}.)"
        return answer.build_messages(f"{message.strip()}\n{known}", ev)

    def draft(self, message: str, memory: dict[str, Any], summary: str, evidence: list[dict[str, str]]) -> str:
        return self._generate(self.draft_messages(message, memory, summary, evidence))

    def refine(self, text: str, critique: dict[str, Any], evidence: list[dict[str, str]]) -> str:
        problems = "\n".join(f"- {i['type']}: {i['detail']}" for i in critique["issues"])
        return self._ask(f"Evidence:\n{self._evidence(evidence)}\n\nDraft answer:\n{text}\n\nA medical auditor "
                         f"found these problems:\n{problems}\nRewrite the answer so that every problem is fixed. "
                         "Remove any unsafe medicine and say why; keep citations.")

    def summarise(self, turns: list[dict[str, Any]]) -> str:
        convo = "\n".join(f"Patient: {t['user']}\nAssistant: {t['answer']}" for t in turns)
        return self._ask(f"Summarise this conversation in at most 3 sentences, keeping every symptom, medicine, "
                         f"allergy, condition and the urgency:\n{convo}")
