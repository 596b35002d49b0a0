"""The medical agent: one turn runs the loop below with explicit state, and every turn is
stored in SQLite in one transaction.

    1 entity extraction → 2 memory update → 3 triage → 4 retrieval → 5 draft →
    6 auditor critique ⇄ 7 refine (at most ``max_rounds``, each round logged) →
    8 safety validation → 9 final answer (citations, triage level and reason, notice;
      HIGH puts the emergency instruction first)
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import kb as knowledge_base
from ..kb import KnowledgeBase
from ..rag.query import QueryAnalyzer
from . import answer, auditor, memory, safety, triage
from .store import Store
from .tools import ToolBox

DEFAULTS = {"mode": "rules", "max_rounds": 3, "top_k": 5, "memory_token_budget": 160, "keep_recent_turns": 2,
            "llm_model": None, "llm_max_new_tokens": 256, "llm_runtime": "transformers"}
_WEIGHT = re.compile(r"(\d{2,3}(?:\.\d+)?)\s*(?:kg|kilos?|kilograms?)\b", re.I)
_HEIGHT_M = re.compile(r"\b([12](?:\.\d{1,2}))\s*(?:m|metres?|meters?)\b", re.I)
_HEIGHT_CM = re.compile(r"\b(\d{3})\s*(?:cm|centimetres?|centimeters?)\b", re.I)
_STOCK = re.compile(r"\b(in stock|have (any )?\w+ in|available|do you (have|stock|sell))\b", re.I)


def copy_rag_index(session, dst: Path) -> bool:
    """Copy 06_rag's persistent ChromaDB index into ``dst``; ``evaluate.build(index_dir=dst)`` then
    reloads it without re-embedding when it holds these chunks under this embedder (content hash),
    and rebuilds it otherwise. False when 06 has not run."""
    import shutil

    from ..artifacts import MissingArtifact

    try:
        src = session.get("rag_index")
    except MissingArtifact:
        return False
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return True


@dataclass
class Reply:
    session_id: str
    patient_id: str
    answer: str
    citations: list[dict[str, str]]
    triage: dict[str, Any]
    reasoning: str
    audit_rounds: list[dict[str, Any]]
    safety_report: dict[str, Any]
    notice: str = answer.NOTICE
    draft: str = ""
    memory: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _noted(facts: list[tuple[str, str]], kb) -> str:
    return ("Thank you, I have noted: " + memory.describe(facts, kb)
            + ". You can see, change or clear what I remember at any time.")


class MedicalAgent:
    """``MedicalAgent(kb=..., retriever=..., store_path=..., cfg=...)``; ``retriever`` is anything
    with ``search(query, k) -> [(evidence id, score)]`` (the RAG ``HybridRetriever``), and
    ``passages`` maps evidence ids to their text."""

    def __init__(self, kb: KnowledgeBase | None = None, retriever=None, store_path: str | Path = "agent.sqlite",
                 cfg: dict[str, Any] | None = None, passages: dict[str, str] | None = None,
                 analyzer: QueryAnalyzer | None = None, llm=None, seed: int = 0):
        self.kb = kb or knowledge_base.load()
        self.cfg = {**DEFAULTS, **(cfg or {})}
        self.retriever = retriever
        self.analyzer = analyzer or QueryAnalyzer(self.kb)
        self.extractor = memory.FactExtractor(self.kb, self.analyzer)
        self.passages = dict(passages or {})
        self.store = Store(store_path)
        self.seed = seed
        self.store.seed_inventory(self.kb, seed)
        self.tools = ToolBox(self.kb, self.store)
        self.llm = llm
        if self.cfg["mode"] == "llm" and llm is None:
            raise ValueError("agent mode 'llm' needs an LLMWriter (medkit.agent.llm); the tiny profile uses 'rules'")

    @classmethod
    def from_session(cls, session, store_path: str | Path | None = None, retriever=None, **overrides) -> "MedicalAgent":
        """Build the agent of a notebook session: the 01_data passages, a hybrid retriever over
        them (BM25 + the profile's embedder in ChromaDB under the session folder) and the store
        ``<session dir>/agent.sqlite``."""
        from ..data import pipeline
        from ..rag import dense, evaluate, text

        kb = knowledge_base.load()
        cfg = {**session.stage("agent"), **overrides}
        passages = pipeline.load_split(session.get("datasets"), "passages", "all")
        chunks = text.chunk(passages, max_words=120, overlap=20)
        analyzer = QueryAnalyzer(kb)
        if retriever is None:
            rag = session.stage("rag")
            encoder = dense.load_encoder(rag["embedder"], session.cfg["device"])
            index_dir = session.dir / "agent_index"
            if not index_dir.exists():
                copy_rag_index(session, index_dir)
            retriever, _ = evaluate.build(chunks, encoder, None, analyzer, index_dir=index_dir, embedder=rag["embedder"])
        llm = None
        if cfg.get("mode") == "llm":
            from .llm import LLMWriter
            llm = LLMWriter(cfg["llm_model"], session, dtype=cfg["dtype"], device=session.cfg["device"],
                            max_new_tokens=cfg.get("llm_max_new_tokens", DEFAULTS["llm_max_new_tokens"]),
                            runtime=cfg.get("llm_runtime", DEFAULTS["llm_runtime"]))
        return cls(kb, retriever, store_path or session.dir / "agent.sqlite", cfg,
                   {c["id"]: c["text"] for c in chunks} | {p["id"]: p["text"] for p in passages},
                   analyzer, llm, session.seed)

    def reopen(self, store_path: str | Path | None = None) -> "MedicalAgent":
        """A new agent object with this one's parts (knowledge base, retriever, settings, passages,
        analyzer and LLM writer, when the mode has one) on ``store_path`` (default: this agent's
        store). What it knows about a patient comes from that store only."""
        return type(self)(self.kb, self.retriever, store_path or self.store.path, self.cfg, self.passages,
                          self.analyzer, self.llm, self.seed)

    # ------------------------------------------------------------ memory the user can see and edit
    def memory(self, patient_id: str) -> dict[str, Any]:
        return self.store.memory(patient_id)

    def remember(self, patient_id: str, kind: str, value: Any) -> dict[str, Any]:
        self.store.remember(patient_id, kind, value)
        return self.memory(patient_id)

    def forget(self, patient_id: str, kind: str | None = None, value: Any = None) -> dict[str, Any]:
        self.store.forget(patient_id, kind, value)
        return self.memory(patient_id)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------ one turn
    def chat(self, message: str, patient_id: str = "p1", session_id: str | None = None) -> Reply:
        state = self._begin(message, patient_id, session_id)
        state["retrieved"] = self._retrieve(state)
        self._compose(state)
        self._commit(state)
        return state["reply"]

    async def achat(self, message: str, patient_id: str = "p1", session_id: str | None = None) -> Reply:
        """The same turn; the store reads, the retrieval and the store write run in worker
        threads so an async server keeps serving other requests meanwhile."""
        state = await asyncio.to_thread(self._begin, message, patient_id, session_id)
        state["retrieved"] = await asyncio.to_thread(self._retrieve, state)
        self._compose(state)
        await asyncio.to_thread(self._commit, state)
        return state["reply"]

    def _begin(self, message: str, patient_id: str, session_id: str | None) -> dict[str, Any]:
        if not isinstance(message, str) or not message.strip():
            raise ValueError("message must be non-empty text")
        if not isinstance(patient_id, str) or not patient_id.strip():
            raise ValueError("patient_id must be non-empty text")
        session_id = session_id or f"s-{uuid.uuid4().hex[:10]}"
        self.store.ensure_session(patient_id, session_id)
        t0 = time.perf_counter()
        message = " ".join(message.replace("’", "'").split())[:2000]
        add, remove = self.extractor.extract(message)                                # 1 entities
        ents = self.analyzer.entities(message)
        mem = memory.apply(self.store.memory(patient_id), add, remove)               # 2 memory
        history = self.store.turns(session_id)
        context = history[-1]["user"] if history else ""
        tri = triage.triage(self.kb, message, mem, context)                           # 3 triage
        summary, upto = self.store.summary(session_id)
        return {"message": message, "patient_id": patient_id, "session_id": session_id, "add": add,
                "remove": remove, "entities": ents, "memory": mem, "triage": tri, "summary": summary,
                "summarised_upto": upto, "history": history, "t0": t0, "context": context,
                "timings": {"understand_ms": (time.perf_counter() - t0) * 1000}}

    def _retrieve(self, state: dict[str, Any]) -> list[tuple[str, float]]:               # 4 retrieval
        if self.retriever is None:
            return []
        if (not auditor.intents(state["message"]) and "?" not in state["message"] and state["add"]
                and state["triage"].level != "HIGH"):
            state["retrieval_skipped"] = True  # the patient only told us facts: acknowledged from memory
            return []
        t = time.perf_counter()
        query = state["message"]
        if len(query.split()) < 6 and state["history"]:  # a short follow-up leans on the last question
            query = f"{state['history'][-1]['user']} {query}"
        hits = self.retriever.search(query[:2000], self.cfg["top_k"])
        state["timings"]["retrieve_ms"] = (time.perf_counter() - t) * 1000
        return hits

    def _tool_calls(self, state: dict[str, Any], msg_drugs: list[str], doses: list[dict]) -> list[dict[str, Any]]:
        mem, msg = state["memory"], state["message"]
        calls = [self.tools.call("department_triage", {k: v for k, v in {
            "text": msg, "age": mem.get("age"), "pregnant": mem.get("pregnant")}.items() if v is not None})]
        for d in msg_drugs[:3]:
            calls.append(self.tools.call("kb_lookup", {"topic": d}))
        meds = [m for m in mem.get("medications", []) if m not in msg_drugs]
        if msg_drugs and meds:
            calls.append(self.tools.call("ddi_check", {"drugs": msg_drugs[:3] + meds}))
        for dose in doses:
            calls.append(self.tools.call("dose_check", {"drug": dose["drug"], "amount": dose["amount"],
                                                        "unit": dose["unit"], "per": dose["per"]}))
        w = _WEIGHT.search(msg)
        h = _HEIGHT_M.search(msg) or _HEIGHT_CM.search(msg)
        if w and h:
            height = float(h.group(1)) / (100 if h.re is _HEIGHT_CM else 1)
            calls.append(self.tools.call("bmi", {"weight_kg": float(w.group(1)), "height_m": height}))
        if _STOCK.search(msg):
            for d in msg_drugs[:2]:
                calls.append(self.tools.call("drug_inventory", {"drug": d}))
        return calls

    def _compose(self, state: dict[str, Any]) -> None:
        t = time.perf_counter()
        kb, mem, tri = self.kb, state["memory"], state["triage"]
        msg_drugs = self.extractor.drug_ids(state["message"])
        doses = auditor.stated_doses(state["message"], self.extractor.drug_ids)
        ev = auditor.Evidence(self.passages)
        ts = auditor.TurnState(state["message"], mem, tri, ev, state["retrieved"], msg_drugs,
                               self.extractor.condition_ids(state["message"]), doses, auditor.intents(state["message"]),
                               state["add"], [e for k in ("condition", "drug", "symptom")
                                              for e in state["entities"].get(k, [])])
        calls = self._tool_calls(state, msg_drugs, doses)
        # 5 draft
        # a message that only tells facts (retrieval skipped) is acknowledged from memory: the model would
        # draft from no evidence, and the auditor drop every uncited sentence (run smol-r15's 07: an empty
        # reply to "I'm allergic to penicillin")
        if self.llm is not None and not state.get("retrieval_skipped"):
            for pid, _ in ts.retrieved:
                ev.add(pid.split("#")[0]) or ev.add(pid)
            text = self.llm.draft(state["message"], mem, state["summary"], ev.items)
            sentences = answer.parse(text, self.extractor.drug_ids)
        else:
            sentences = auditor.rule_draft(ts, kb, self.extractor.drug_ids)
        for call in calls:  # tool results the patient asked for become cited sentences
            if call["ok"] and call["name"] == "bmi":
                r = call["result"]
                n = ev.add("tool.bmi", f"BMI {r['bmi']} kg/m2 ({r['category']}; {r['note']}).")
                sentences.append(answer.Sentence(f"Your BMI is {r['bmi']} kg/m2, in the {r['category']} range for adults.", [n], "info"))
            if call["ok"] and call["name"] == "drug_inventory":
                r = call["result"]
                n = ev.add(f"tool.inventory.{r['drug_id']}", f"{r['name']} {r['strength']} {r['form']}: {r['stock']} in stock.")
                said = (f"The pharmacy has {r['name']} {r['strength']} {r['form']} in stock ({r['stock']})."
                        if r["in_stock"] else f"The pharmacy has no {r['name']} in stock at the moment.")
                sentences.append(answer.Sentence(said, [n], "info"))
        if not sentences and state["add"]:
            sentences.append(answer.Sentence(_noted(state["add"], kb), [], "advice"))
        elif not sentences and tri.level != "HIGH":
            sentences.append(answer.Sentence("I could not find anything in my sources about that. Could you tell me "
                                             "more: your symptoms, how long you have had them, and any medicines you take?",
                                             [], "advice"))
        draft_text = answer.render(sentences)
        # 6-7 audit and refine
        rounds = []
        levels = kb.triage["levels"]
        for r in range(1, self.cfg["max_rounds"] + 1):
            crit = auditor.critique(sentences, ts, kb, r)
            rounds.append({"round": r, "ok": crit["ok"], "issues": crit["issues"], "draft": answer.render(sentences)})
            if crit["ok"]:
                break
            if self.llm is not None:
                refined = answer.parse(self.llm.refine(answer.render(sentences), crit, ev.items), self.extractor.drug_ids)
                sentences = auditor.refine(refined, auditor.critique(refined, ts, kb, r), ts, kb, levels)
            else:
                sentences = auditor.refine(sentences, crit, ts, kb, levels)
        else:
            crit = auditor.critique(sentences, ts, kb, self.cfg["max_rounds"] + 1)
            if not crit["ok"]:
                sentences = auditor.final_fallback(sentences, crit)
                rounds.append({"round": crit["round"], "ok": False, "issues": crit["issues"],
                               "draft": answer.render(sentences), "fallback": "dropped the sentences still at issue"})
        said = any(s.kind in ("info", "recommend", "dose", "warning", "advice") for s in sentences)
        if tri.level != "HIGH" and not said and state["add"]:
            sentences.append(answer.Sentence(_noted(state["add"], kb), [], "advice"))
        elif tri.level != "HIGH" and not said:
            sentences.append(answer.Sentence("I could not answer that safely from my sources. Please ask a pharmacist "
                                             "or doctor, and tell them your symptoms and the medicines you take.",
                                             [], "advice"))
        # 9 assemble (8 validates it)
        dept = next((c["result"]["department"] for c in calls if c["ok"] and c["name"] == "department_triage"),
                    "General Practice")
        body = answer.render(sentences)
        lvl = levels[tri.level]
        triage_line = f"Triage: {tri.level} ({lvl['label']}). {tri.reason}"
        if tri.level != "HIGH":
            triage_line += f" {' '.join(lvl['action'].split())} Department: {dept}."
        if tri.level == "HIGH":
            head = [s for s in sentences if s.kind == "emergency"]
            rest = [s for s in sentences if s.kind != "emergency"]
            text = f"{answer.render(head)}\n\n{triage_line}\n\n{answer.render(rest)}".strip()
        else:
            text = f"{body}\n\n{triage_line}"
        text = f"{text}\n\n{answer.NOTICE}"
        final, report = safety.check(text, state["message"], mem, state["context"],    # 8 safety
                                     extractor=self.extractor)
        used = sorted({n for s in sentences for n in s.cites})
        citations = [{"id": f"E{n}", "evidence_id": ev.items[n - 1]["id"], "text": ev.items[n - 1]["text"]}
                     for n in used]
        state["timings"]["compose_ms"] = (time.perf_counter() - t) * 1000
        reasoning = "\n".join([
            f"1. Entities: {state['entities'] or 'none'}; facts read: {state['add'] or 'none'}"
            + (f"; no longer: {state['remove']}" if state["remove"] else ""),
            f"2. Memory: allergies {mem['allergies']}, medications {mem['medications']}, conditions "
            f"{mem['conditions']}, age {mem['age']}, pregnant {mem['pregnant']}"
            + (f"; summary of earlier turns: {state['summary']}" if state["summary"] else ""),
            f"3. Triage: {tri.level}: {tri.reason}",
            f"4. Retrieved: {[pid for pid, _ in state['retrieved']]}"
            + (" (skipped: the message only stated facts)" if state.get("retrieval_skipped") else ""),
            f"5. Draft ({'LLM' if self.llm else 'rules'}): {draft_text[:300]}",
            *[f"6-7. Audit round {rd['round']}: "
              + ("no issues" if rd["ok"] else "; ".join(f"{x['type']} ({x['severity']}): {x['detail']}" for x in rd["issues"]))
              for rd in rounds],
            f"8. Safety: risk {report['risk_level']}, {len(report['warnings'])} warning(s)",
            f"Tools: {[(c['name'], 'ok' if c['ok'] else c['error']) for c in calls]}"])
        state["reply"] = Reply(state["session_id"], state["patient_id"], final, citations,
                               {"level": tri.level, "reason": tri.reason, "department": dept,
                                "red_flags": [f["id"] for f in tri.red_flags]},
                               reasoning, rounds, report, answer.NOTICE, draft_text, mem, calls,
                               state["timings"])

    def _commit(self, state: dict[str, Any]) -> None:
        reply: Reply = state["reply"]
        t = time.perf_counter()
        turns = state["history"] + [{"user": state["message"], "answer": reply.answer, "triage": reply.triage["level"]}]
        upto = state["summarised_upto"]

        def summarise(old):
            if self.llm is not None:  # a model's summary is kept only when it is faithful (else extractive)
                text = self.llm.summarise(old)
                if memory.summary_problem(text, old, self.extractor) is None:
                    return text
            return memory.extractive_summary(old, self.extractor)

        summary, recent = memory.compress(state["summary"], turns[upto:], self.cfg["memory_token_budget"],
                                          self.cfg["keep_recent_turns"], summarise)
        rec = {"session_id": state["session_id"], "patient_id": state["patient_id"], "user": state["message"],
               "answer": reply.answer, "triage": reply.triage, "retrieved": state["retrieved"],
               "memory_add": [(k, v, "chat") for k, v in state["add"]], "memory_remove": state["remove"],
               "tool_calls": reply.tool_calls, "audit_rounds": reply.audit_rounds, "response": reply.to_dict()}
        if summary != state["summary"]:
            rec["summary"], rec["summarised_upto"] = summary, len(turns) - len(recent)
        self.store.record_turn(rec)
        reply.timings_ms["store_ms"] = (time.perf_counter() - t) * 1000
        reply.timings_ms["total_ms"] = (time.perf_counter() - state["t0"]) * 1000
