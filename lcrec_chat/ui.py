"""The Gradio 6 app around ``chat.ChatEngine``: page, streaming chat handler, a stateless JSON API, ``serve``.

Endpoints (``gradio_client.Client(url).predict(..., api_name=...)``):
  /chat       message -> (chat messages, last reply as JSON); stateful per client session, streamed.
  /recommend  message, history (titles or item indices, optional), k -> {"text", "items", ...}; stateless.
  /reset      forget this session.

Safety: every catalogue or user string shown is HTML-escaped here; messages longer than
``chat.max_message_chars`` are refused on the server (the browser limit alone can be bypassed); user state
lives only in per-session ``gr.State`` (deleted when the tab closes or after ``STATE_TTL_S``); the server binds
``chat.host`` (127.0.0.1 by default) and serves no files beyond ``assets/``.
"""
from __future__ import annotations

import html
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .chat import ChatEngine, CoWatch, Reply, Session
from .config import Config
from .data.domain import MOVIE, Domain, article
from .serving import MethodRouter

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
if TYPE_CHECKING:   # gradio is imported where the page is built: `serve` overlaps that import with the model load
    import gradio as gr

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
STATE_TTL_S = 2 * 3600          # a session's state is dropped after 2 h without a message
MAX_SHOWN_MESSAGES = 60         # chat messages kept per session (older ones scroll away)
STATE_SESSIONS = 2000           # sessions whose state the server keeps at most
SHOWN_USER_CHARS = 300
CHAT_MIN_HEIGHT = 520           # px: room for one answer with its cards from the start
CHAT_MAX_HEIGHT = "85vh"        # the chat panel grows with the conversation up to this, then scrolls
# run folder artifacts the app needs, and the stage that writes each
REQUIRED = {"catalog.sqlite": "prepare", "split.json": "prepare", "codes.json": "index", "adapter": "train"}


# --------------------------------------------------------------------------------------------- rendering

def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_reply(reply: Reply) -> str:
    """A reply as one line of HTML (no blank lines, so markdown leaves it alone); every string escaped."""
    parts = ['<div class="lcrec-reply">']
    parts += [f'<p class="lcrec-line">{_esc(line)}</p>' for line in reply.lines if line]
    if reply.cards:
        parts.append('<ol class="lcrec-cards">')
        for c in reply.cards:
            year = f' <span class="lcrec-year">({_esc(c.year)})</span>' if c.year else ""
            genres = "".join(f'<span class="lcrec-genre">{_esc(g)}</span>' for g in c.genres if g != "unknown")
            parts.append(f'<li class="lcrec-card" data-idx="{int(c.idx)}"><div class="lcrec-title">'
                         f'<span class="lcrec-rank">{int(c.rank)}.</span>{_esc(c.title)}{year}</div>'
                         f'<div class="lcrec-genres">{genres}</div>'
                         f'<div class="lcrec-reason">{_esc(c.reason)}</div></li>')
        parts.append("</ol>")
    elif not reply.done:
        parts.append('<p class="lcrec-pending">…</p>')
    parts.append("</div>")
    return "".join(parts)


def render_user(message: str) -> str:
    shown = message if len(message) <= SHOWN_USER_CHARS else \
        f"{message[:SHOWN_USER_CHARS]}… ({len(message):,} characters)"
    return _esc(shown)


# --------------------------------------------------------------------------------------------- loading

def missing_artifacts(run_dir: str | Path) -> list[str]:
    run = Path(run_dir)
    return [f"{name} (written by the '{stage}' stage)" for name, stage in REQUIRED.items()
            if not (run / name).exists()]


def load_cowatch(run_dir: str | Path) -> CoWatch | None:
    """Who watched what in the run's training split, for reasons like "watched by 12 of the 40 people who
    watched Fargo"; None (reasons without it) when the split cannot be read."""
    from .data.dataset import DataError
    from .data.split import Split
    try:
        return CoWatch(Split.load(Path(run_dir) / "split.json").train_sequences())
    except DataError as e:
        log.warning("chat: reasons without co-viewing counts (%s)", e)
        return None


def load_engine(cfg: Config) -> tuple[ChatEngine, str]:
    """The engine for ``cfg.run_dir`` and a status line for the page. Never raises: a missing run folder or
    a model that fails to load gives an engine that says so (titles still resolve when the catalogue loads)."""
    from .catalog import Catalog, CatalogError
    run = Path(cfg.run_dir)
    how = f"build it with `python -m lcrec_chat pipeline --config <preset> --set run_dir={run}`"
    if not run.is_dir():
        msg = f"run folder `{run}` not found; {how}."
        return ChatEngine(None, None, cfg.chat, model_error=msg, catalog_error=msg), f"⚠ {msg}"
    missing = missing_artifacts(run)
    catalog, catalog_error = None, ""
    try:
        catalog = Catalog(run / "catalog.sqlite")
    except CatalogError as e:
        catalog_error = str(e)
    if missing:
        msg = f"run folder `{run}` is incomplete, missing: {', '.join(missing)}; {how}."
        return ChatEngine(catalog, None, cfg.chat, model_error=msg, catalog_error=catalog_error or msg), f"⚠ {msg}"
    if cfg.chat.history_prompt not in ("dense", "chat"):
        msg = f"chat.history_prompt must be dense or chat, got {cfg.chat.history_prompt!r}"
        return ChatEngine(catalog, None, cfg.chat, model_error=msg, catalog_error=catalog_error), f"⚠ {msg}"
    try:
        from .serving import MethodRouter
        router = MethodRouter(cfg, run, cfg.chat.method)
        router.get(router.default)   # the default method loads now; the others when a session first picks them
    except Exception as e:   # any failure to load must leave a running page that explains it
        log.exception("model failed to load from %s", run)
        msg = f"the model failed to load from `{run}` ({type(e).__name__}: {e})"
        return ChatEngine(catalog, None, cfg.chat, model_error=msg, catalog_error=catalog_error), f"⚠ {msg}"
    engine = ChatEngine(router.catalog, router, cfg.chat, cowatch=load_cowatch(run))
    status = (f"{router.label()}: model `{cfg.model.base}` ({cfg.model.dtype}) with the run `{run}` · "
              f"{len(router.catalog):,} items from {router.catalog.dataset_name or 'the catalogue'}")
    return engine, status


# --------------------------------------------------------------------------------------------- the page

def _examples(domain: Domain) -> dict:
    """Example prompts and conversations; they name MovieLens titles, so other domains get none."""
    try:
        return json.loads((ASSETS / "examples.json").read_text()) if domain == MOVIE else {}
    except (OSError, ValueError):
        return {}


def _how_it_works(domain: Domain) -> str:
    try:
        text = (ASSETS / "how_it_works.md").read_text()
    except OSError:
        text = ""
    convs = _examples(domain).get("conversations") or []
    if convs:
        text += "\n\n**Example conversations** (one message per arrow):\n\n" + "\n".join(
            "- " + " → ".join(f"“{m}”" for m in conv) for conv in convs)
    return text


def input_placeholder(domain: Domain) -> str:
    """The hint in the empty message box: the domain's example history and wish."""
    examples = [e for e in (domain.example_history, domain.example_wish) if e]
    return "e.g. " + " — or — ".join(examples)


def build_app(engine: ChatEngine, cfg: Config, status: str) -> gr.Blocks:
    """The page, in the words of the catalogue the engine serves. Handlers close over the shared engine only;
    everything per user is in gr.State."""
    import gradio as gr

    def on_message(message: str, session: Session | None, messages: list | None) -> Iterator[tuple]:
        session = session if isinstance(session, Session) else engine.new_session()
        message = message if isinstance(message, str) else ""
        history = list(messages or [])[-MAX_SHOWN_MESSAGES:]
        history.append({"role": "user", "content": render_user(message)})
        for reply in engine.respond(message, session):
            shown = history + [{"role": "assistant", "content": render_reply(reply)}]
            # a message that could not be answered stays in the box, to be fixed rather than typed again
            yield message if reply.kind == "error" else "", shown, session, shown, reply.as_dict()

    def on_reset(session: Session | None) -> tuple:
        fresh = engine.new_session()
        if isinstance(session, Session):   # the recommender picked on the page stays picked
            fresh.method = session.method
        return [], fresh, [], {}

    def on_method(method: str, session: Session | None) -> Session:
        session = session if isinstance(session, Session) else engine.new_session()
        session.method = method if method in methods else ""
        return session

    def recommend(message: str, history: list[str | int] | None = None, k: int = cfg.chat.default_k,
                  method: str = "") -> dict:
        """Stateless recommendations. message: a wish and/or titles, as typed in the chat (may be empty when
        history is given). history: titles or catalogue item indices the user liked, oldest first. k: number of
        items (capped by the server). method: one of the recommenders the app serves ("" = its default).
        Returns {"text", "kind", "items": [{"rank", "idx", "title", "year", "genres", "reason", "score"}],
        "recognised", "unknown", "request"}."""
        if not isinstance(message, str):
            message = ""
        try:
            k = int(k)
        except (TypeError, ValueError):
            k = cfg.chat.default_k
        if method and method not in methods:
            return {"text": f"Unknown method {method!r}; this app serves {', '.join(methods) or 'none'}.",
                    "kind": "error", "items": [], "recognised": [], "unknown": [], "request": {}}
        with model_slots:
            return engine.answer(message, history if isinstance(history, list) else None, k, method or "")

    model_slots = threading.BoundedSemaphore(max(1, cfg.chat.concurrency))
    domain = engine.domain
    router = engine.recommend_fn if isinstance(engine.recommend_fn, MethodRouter) else None
    methods = {m: router.label(m) for m in router.available} if router else {}
    examples = _examples(domain).get("prompts") or []
    with gr.Blocks(title=f"LC-Rec chat: {domain.kind} recommendations") as demo:
        gr.Markdown("## LC-Rec chat\nA small language model tuned to recommend by writing item codes. "
                    "Tell it what you liked or what you are in the mood for.")
        gr.Markdown(status, elem_classes=["lcrec-status-error"] if status.startswith("⚠") else ["lcrec-status"],
                    elem_id="lcrec-status")
        session_state = gr.State(None, time_to_live=STATE_TTL_S)
        messages_state = gr.State([], time_to_live=STATE_TTL_S)
        # no fixed height: the panel grows with the conversation up to most of the window, so earlier turns stay
        # on screen above the new one; past that it scrolls, following the newest reply (autoscroll)
        chatbot = gr.Chatbot(show_label=False, elem_id="lcrec-chat", height=None, min_height=CHAT_MIN_HEIGHT,
                             max_height=CHAT_MAX_HEIGHT, autoscroll=True, resizable=True, feedback_options=None,
                             layout="panel", buttons=["copy"],
                             placeholder=f"Ask for {article(domain.kind)}, or paste a few you liked.")
        with gr.Row():
            box = gr.Textbox(show_label=False, placeholder=input_placeholder(domain),
                             max_length=cfg.chat.max_message_chars, lines=1, scale=6, elem_id="lcrec-input",
                             autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="lcrec-send")
            clear = gr.Button("Start over", scale=1, elem_id="lcrec-reset")
        if len(methods) > 1:
            method_choice = gr.Radio(choices=[(label, m) for m, label in methods.items()], value=router.default,
                                     label="Recommender", elem_id="lcrec-method",
                                     info="LC-Rec is this app's model; the others are trained on the same data "
                                          "for comparison (model card)")
            method_choice.change(on_method, [method_choice, session_state], [session_state],
                                 api_visibility="private")
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[box], label="Try")
        with gr.Accordion("How it works", open=False):
            gr.Markdown(_how_it_works(domain))
        with gr.Accordion("Last reply as data (what the API returns)", open=False):
            data = gr.JSON(label="reply", elem_id="lcrec-json")

        outputs = [box, chatbot, session_state, messages_state, data]
        inputs = [box, session_state, messages_state]
        # Enter and the Send button are one handler: one concurrency limit between them, not one each
        box.submit(on_message, inputs, outputs, api_name="chat", concurrency_id="chat")
        send.click(on_message, inputs, outputs, api_visibility="private", concurrency_id="chat")
        clear.click(on_reset, [session_state], [chatbot, session_state, messages_state, data], api_name="reset")
        # outside gradio's queue: a queued call costs ~0.2 s of hand-offs on 2 cores (submit, queue loop, event
        # stream); the semaphore keeps the queue's limit of chat.concurrency requests on the model at once
        gr.api(recommend, api_name="recommend", queue=False)
    return demo


def launch(demo: gr.Blocks, cfg: Config, block: bool = True, port: int | None = None) -> str:
    """Queue and start the server; returns its local URL (with block=False the call returns at once)."""
    import gradio as gr
    css = (ASSETS / "style.css").read_text() if (ASSETS / "style.css").exists() else None
    demo.queue(max_size=cfg.chat.queue_size, default_concurrency_limit=cfg.chat.concurrency)
    _, url, _ = demo.launch(server_name=cfg.chat.host, server_port=port if port is not None else cfg.chat.port,
                            share=cfg.chat.share, allowed_paths=[str(ASSETS)], css=css, theme=gr.themes.Soft(),
                            prevent_thread_lock=not block, ssr_mode=False, show_error=False, quiet=not block,
                            state_session_capacity=STATE_SESSIONS, max_file_size="1mb")
    return url


def _import_model_stack() -> None:
    """Import what loading the engine imports, in this thread: two threads importing the same packages at once
    can deadlock on Python's per-module import locks (huggingface_hub, for one, is imported by both transformers
    and gradio)."""
    import sqlite3  # noqa: F401

    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torch.ao.nn.quantized.dynamic  # noqa: F401
    import torch.ao.quantization  # noqa: F401
    from transformers import PreTrainedTokenizerFast  # noqa: F401

    from . import backbone, baselines, catalog, collab_prompt, llama, recommender  # noqa: F401


def serve(cfg: Config, block: bool = True, port: int | None = None, error: str = "") -> tuple[gr.Blocks, str]:
    """Load the run in ``cfg.run_dir`` and serve the chat on ``cfg.chat.host:port``; with an ``error`` (the run's
    settings could not be read), serve a page that says so instead of loading anything.

    The engine loads in a worker thread while this one imports gradio (~5 s on a 2-core CPU): reading the weights,
    folding LoRA in and packing the int8 layers run in C++ without the GIL, so the two overlap on two cores."""
    from concurrent.futures import ThreadPoolExecutor
    if error:
        engine, status = ChatEngine(None, None, cfg.chat, model_error=error, catalog_error=error), f"⚠ {error}"
    else:
        _import_model_stack()
        with ThreadPoolExecutor(1, thread_name_prefix="load-engine") as pool:
            loading = pool.submit(load_engine, cfg)
            import gradio  # noqa: F401
            engine, status = loading.result()
    log.info("chat: %s", status)
    demo = build_app(engine, cfg, status)
    url = launch(demo, cfg, block=block, port=port)
    return demo, url
