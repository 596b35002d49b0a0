"""The chat cell of 07_agent: an ipywidgets chat with an input box, the conversation, a triage
badge, a sources panel (the [E#] passages), a collapsible reasoning block and a memory panel
where the user can see, add and clear what is remembered.

Under papermill or CI (``medkit.notebook.headless()``) nothing waits for input: the cell plays
a scripted conversation through the same code and renders the transcript as HTML.
"""
from __future__ import annotations

import html
from typing import Any

from .. import notebook
from .store import ENTITY_KINDS

BADGE_COLOURS = {"HIGH": "#b00020", "MEDIUM": "#b26a00", "LOW": "#1b7a2f"}


def badge_html(triage: dict[str, Any]) -> str:
    lvl = triage["level"]
    return (f'<span class="medkit-badge medkit-badge-{lvl.lower()}" style="background:{BADGE_COLOURS[lvl]};'
            f'color:white;padding:2px 8px;border-radius:4px;font-weight:bold">Triage {lvl}</span> '
            f'<span class="medkit-badge-reason">{html.escape(triage["reason"])}</span>')


def sources_html(citations: list[dict[str, str]]) -> str:
    if not citations:
        return '<div class="medkit-sources"><i>No sources cited in this answer.</i></div>'
    items = "".join(f"<li><b>[{c['id']}]</b> <code>{html.escape(c.get('evidence_id', ''))}</code> "
                    f"{html.escape(c['text'])}</li>" for c in citations)
    return f'<div class="medkit-sources"><b>Sources</b><ol style="list-style:none;padding-left:0">{items}</ol></div>'


def memory_html(mem: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{k}</td><td>{html.escape(', '.join(v) if isinstance(v, list) else str(v))}</td></tr>"
                   for k, v in mem.items())
    return f'<div class="medkit-memory"><b>Remembered</b><table>{rows}</table></div>'


def turn_html(message: str, reply, details: bool = True) -> str:
    """One exchange; ``details`` adds its sources and the collapsible reasoning (the transcript)."""
    answer = html.escape(reply.answer).replace("\n\n", "<br><br>")
    extra = (f'{sources_html(reply.citations)}<details><summary>Reasoning</summary><pre style="white-space:pre-wrap">'
             f'{html.escape(reply.reasoning)}</pre></details>') if details else ""
    return (f'<div class="medkit-turn"><div><b>You:</b> {html.escape(message)}</div>'
            f'<div>{badge_html(reply.triage)}</div><div class="medkit-answer"><b>Assistant:</b> {answer}</div>'
            f'{extra}</div><hr>')


class ChatUI:
    """``ChatUI(agent, patient_id)``; ``.send(text)`` runs one turn and refreshes every panel
    (the input box calls it; so does the scripted transcript)."""

    def __init__(self, agent, patient_id: str = "demo-patient", session_id: str | None = None):
        self.agent, self.patient_id, self.session_id = agent, patient_id, session_id
        self.turns: list[tuple[str, Any]] = []
        self._box = None

    # ------------------------------------------------------------ logic shared by both modes
    def send(self, message: str):
        reply = self.agent.chat(message, patient_id=self.patient_id, session_id=self.session_id)
        self.session_id = reply.session_id
        self.turns.append((message, reply))
        if self._box is not None:
            self._refresh(reply)
        return reply

    def transcript_html(self) -> str:
        mem = self.agent.memory(self.patient_id)
        return (f'<div class="medkit-chat-transcript"><h4>Scripted conversation (patient {html.escape(self.patient_id)})</h4>'
                + "".join(turn_html(m, r) for m, r in self.turns) + memory_html(mem) + "</div>")

    # ------------------------------------------------------------ widgets
    def widget(self):
        import ipywidgets as w

        self.input = w.Text(placeholder="Describe your symptoms or ask about a medicine, then press Enter",
                            continuous_update=False, layout=w.Layout(width="100%"))
        self.input.add_class("medkit-chat-input")
        self.status = w.HTML("")
        self.conversation = w.HTML("<i>No messages yet.</i>")
        self.conversation.add_class("medkit-conversation")
        self.badge = w.HTML("")
        self.badge.add_class("medkit-badge-box")
        self.sources = w.HTML("")
        self.sources.add_class("medkit-sources-box")
        self.reasoning = w.HTML("")
        reasoning_box = w.Accordion(children=[self.reasoning])
        reasoning_box.set_title(0, "Reasoning (entities, memory, triage, retrieval, audit rounds, safety)")
        reasoning_box.selected_index = None
        self.memory_view = w.HTML(memory_html(self.agent.memory(self.patient_id)))
        self.memory_kind = w.Dropdown(options=list(ENTITY_KINDS), value="allergy", layout=w.Layout(width="140px"))
        self.memory_value = w.Text(placeholder="value, e.g. penicillin", layout=w.Layout(width="200px"))
        add, clear = w.Button(description="Remember"), w.Button(description="Forget all", button_style="warning")
        add.on_click(self._remember)
        clear.on_click(self._forget)
        self.input.observe(self._on_submit, names="value")
        self._box = w.VBox([w.HTML(f"<b>medkit agent</b> · patient <code>{html.escape(self.patient_id)}</code>"),
                            self.conversation, self.badge, self.input, self.status, self.sources, reasoning_box,
                            self.memory_view, w.HBox([self.memory_kind, self.memory_value, add, clear])])
        self._box.add_class("medkit-chat")
        return self._box

    def _on_submit(self, change) -> None:
        text = (change.get("new") or "").strip()
        if not text:
            return
        self.status.value = "<i>thinking…</i>"
        try:
            self.send(text)
            self.status.value = ""
        except ValueError as exc:  # bad input: say so in the widget, never crash the cell
            self.status.value = f'<span style="color:#b00020">{html.escape(str(exc))}</span>'
        self.input.value = ""

    def _refresh(self, reply) -> None:
        self.conversation.value = "".join(turn_html(m, r, details=False) for m, r in self.turns)
        self.badge.value = badge_html(reply.triage)
        self.sources.value = sources_html(reply.citations)
        self.reasoning.value = f'<pre style="white-space:pre-wrap">{html.escape(reply.reasoning)}</pre>'
        self.memory_view.value = memory_html(self.agent.memory(self.patient_id))

    def _remember(self, _button) -> None:
        try:
            self.agent.remember(self.patient_id, self.memory_kind.value, self.memory_value.value.strip())
            self.memory_value.value = ""
        except ValueError as exc:
            self.status.value = f'<span style="color:#b00020">{html.escape(str(exc))}</span>'
        self.memory_view.value = memory_html(self.agent.memory(self.patient_id))

    def _forget(self, _button) -> None:
        self.agent.forget(self.patient_id)
        self.memory_view.value = memory_html(self.agent.memory(self.patient_id))


def chat_cell(agent, script: list[str], patient_id: str = "demo-patient", interactive: bool | None = None) -> ChatUI:
    """Show the chat widget; headless (papermill/CI) or ``interactive=False``: play ``script``
    and display the transcript instead of waiting for input."""
    from IPython.display import HTML, display

    interactive = (not notebook.headless()) if interactive is None else interactive
    ui = ChatUI(agent, patient_id)
    if interactive:
        display(ui.widget())
    else:
        for message in script:
            ui.send(message)
        display(HTML(ui.transcript_html()))
    return ui
