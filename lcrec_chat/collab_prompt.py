"""LC-Rec's dense history prompt with collaborative tokens: CoLLM's idea inside LC-Rec (issue 12's lever).

The dense form lists the history's item codes as the start of the answer, "<code 1>, <code 2>, ", and the model
continues with the next item's code. Here each ", " is followed by one collaborative token: a placeholder whose
input embedding is a sequential model's state after the items so far (the vector that model scores the next item
with), mapped into the token-embedding space by a trained `CollabMapper`:

    "<code 1>, [s1]<code 2>, [s2]...<code n>, [sn]"  ->  the model writes <code n+1>

So the code the model writes next always sits right after the collaborative model's view of the same history.
Training windows supervise every item's code (the dense rule), and [si] depends only on items 1..i, so no
position sees the future.

With `train.collab_on_codes`, each code token after [si] also gets a learned addition from the same state (one
per code level, `CollabMapper.code_vectors`), in training, in the prompt and on the tokens decoding writes. The
motive was measured (bench/level_agreement.py): the model matches its teacher's first code closely, where [si]
sits in its own residual stream, and loses most at the second, predicted from the first code's position, where
the state has to be fetched by attention. (Measured since: it did not narrow that gap; the model card says what
it gave.) With `train.collab_head`, the same state also adds one learned vector per level to the model's last
hidden state where it writes each code after [si]: through the tied output head, a direct map of the state onto
the code logits (bench/code_learnability.py: a small model reading only SASRec's state learns SASRec's code
conditionals nearly exactly through these codes, the tuned LLM does not). With `train.collab_head_width`, the head
also has a small MLP per level that reads the state and the code tokens already written, so the same state can rank
a level's shared code tokens differently under each prefix (decoding feeds it each beam's written codes). With
`train.head_refit_sources` the head (by default only the head) also reads other sequential models' states
after the same items (`head_sources`, e.g. GRU4Rec's: the distillation teacher mixes it in, and SASRec's state alone
cannot say what it adds). With `train.prompt_reads_head_sources` the prompt's tokens read them too: each [si] is then
the mapped state of every sequential model after items 1..i, so the LLM itself reads what its teacher, their mixture,
reads. The prompt and the head take the same vectors (`head_states`), computed once.

Token ids are assembled piece by piece: the item codes are added special tokens and ", " tokenises alone, so the
ids are those of the joined text.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from .methods.collab_tokens import CollabMapper, CollabSource, SASRecSource, embed_with_collab, placeholder_id
from .decoding import CollabInputs, PrefixHead
from .run_folder import load_sequential
from .tasks import HISTORY_SEP, TaskBuilder, chat_prompt, end_of_turn

IGNORE = -100
MAPPER_FILE = "collab_mapper.pt"   # beside the adapter it was trained with


def code_token_ids(tokenizer, builder: TaskBuilder) -> list[int]:
    """Every token id the run's item codes are written with (the collaborative head's prefix vocabulary)."""
    return sorted({t for text in builder.code_text for t in tokenizer(text, add_special_tokens=False)["input_ids"]})


class CollabDensePrompts:
    """Token ids (training and inference) and collaborative vectors of the dense prompt; `mapper` None gives the
    plain dense form (no collaborative tokens), so both arms of a comparison share every other step."""

    def __init__(self, tokenizer, builder: TaskBuilder, source: CollabSource, mapper: CollabMapper | None,
                 head_sources: dict[str, SASRecSource] | None = None):
        self.tokenizer, self.builder, self.source, self.mapper = tokenizer, builder, source, mapper
        self.head_sources = dict(head_sources or {})
        extra = sum(s.dim for s in self.head_sources.values())
        if mapper is not None and mapper.head_extra_dim != extra:
            raise ValueError(f"the mapper's head reads {mapper.head_extra_dim} extra state dimensions, the head sources "
                             f"{sorted(self.head_sources)} give {extra}")
        self.placeholder = placeholder_id(tokenizer)[1] if mapper is not None else None
        self.context_text = chat_prompt(tokenizer, builder.prompts.dense)
        self.context = self._ids(self.context_text)
        self.sep = self._ids(HISTORY_SEP)
        self.end = self._ids(end_of_turn(tokenizer))

    @classmethod
    def for_run(cls, tokenizer, builder: TaskBuilder, run: Path, adapter_dir: Path, code_levels: int | None = None,
                logit_levels: int | None = None, prefix_width: int | None = None,
                head_sources: Sequence[str] | None = None, prompt_extra: bool | None = None
                ) -> "CollabDensePrompts | None":
        """The collaborative prompts an adapter was trained with (its collab_mapper.pt and the run's sasrec.pt), or
        None for an adapter trained without them. `code_levels` / `logit_levels` / `prefix_width` / `head_sources`
        (when continuing the training) add the additions on the code tokens / on the code logits / the head's prefix
        MLP / the head's extra states (the run's <name>.pt models) to a mapper saved without them; `prompt_extra` True
        lets the prompt's tokens read the head's extra states too (train.prompt_reads_head_sources). They start at
        zero."""
        path = Path(adapter_dir) / MAPPER_FILE
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        levels = {}
        for key, asked, lever in (("code_levels", code_levels, "train.collab_on_codes"),
                                  ("logit_levels", logit_levels, "train.collab_head"),
                                  ("prefix_width", prefix_width, "train.collab_head_width")):
            levels[key] = saved.get(key, 0) if asked is None else asked
            if saved.get(key, 0) and levels[key] != saved[key]:
                raise ValueError(f"{path} has {key} {saved[key]}; continuing it with {levels[key]} would drop or "
                                 f"reshape what it learned ({lever})")
        tokens: Sequence[int] = ()
        if levels["prefix_width"]:
            saved_tokens = saved["state"].get("on_logits_prefix_tokens")
            tokens = saved_tokens.tolist() if saved_tokens is not None else code_token_ids(tokenizer, builder)
        names = list(saved.get("head_sources", []))
        if head_sources is not None:
            if names and list(head_sources) != names:
                raise ValueError(f"{path}'s head reads the states of {names}; continuing it with {list(head_sources)} "
                                 "would drop or reshape what it learned (train.head_refit_sources)")
            names = list(head_sources)
        saved_prompt = bool(saved.get("prompt_extra", False))
        if prompt_extra is None:
            prompt_extra = saved_prompt
        if saved_prompt and not prompt_extra:
            raise ValueError(f"{path}'s prompt reads its head's extra states; continuing it without them would drop "
                             "what it learned (train.prompt_reads_head_sources)")
        if prompt_extra and not names:
            raise ValueError(f"the prompt can read the head's extra states only where the head has some: {path} has "
                             "none (train.prompt_reads_head_sources needs train.head_refit_sources, refitted before)")
        sasrec, extra = Path(run) / "sasrec.pt", load_sequential(run, names)
        mapper = CollabMapper(saved["collab_dim"], saved["token_dim"], 1.0, saved["hidden"], **levels,
                              prefix_tokens=tokens, head_extra_dim=sum(s.dim for s in extra.values()),
                              prompt_reads_extra=prompt_extra)
        missing, unexpected = mapper.load_state_dict(saved["state"], strict=False)
        if unexpected or any(not key.startswith(("on_codes_", "on_logits_", "prompt_extra_")) for key in missing):
            raise ValueError(f"{path} does not fit a collaborative mapper: missing {missing}, unexpected {unexpected}")
        if not sasrec.is_file():
            raise FileNotFoundError(f"{adapter_dir} was trained with collaborative tokens from SASRec, but {sasrec} "
                                    "is missing: run the baselines stage (python -m lcrec_chat baselines)")
        return cls(tokenizer, builder, SASRecSource.load(sasrec), mapper.eval(), extra)

    def save_mapper(self, adapter_dir: Path) -> None:
        m = self.mapper
        torch.save({"state": m.state_dict(), "collab_dim": m.collab_dim, "token_dim": m.token_dim,
                    "hidden": m.hidden, "code_levels": m.code_levels, "logit_levels": m.logit_levels,
                    "prefix_width": m.prefix_width, "head_sources": list(self.head_sources),
                    "prompt_extra": m.prompt_reads_extra,
                    "source": self.source.kind},
                   Path(adapter_dir) / MAPPER_FILE)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @lru_cache(maxsize=None)
    def code_ids(self, item: int) -> tuple[int, ...]:
        return tuple(self._ids(self.builder.code_text[item]))

    def _history_ids(self, items: Sequence[int], close_last: bool) -> tuple[list[int], list[int]]:
        """(ids, labels) of "<code>, [s]" per item; the last item without ", [s]" unless `close_last`."""
        ids, labels = [], []
        for t, item in enumerate(items):
            code = list(self.code_ids(item))
            ids += code
            labels += code
            if t < len(items) - 1 or close_last:
                ids += self.sep
                labels += self.sep
                if self.placeholder is not None:
                    ids.append(self.placeholder)
                    labels.append(IGNORE)
        return ids, labels

    def training_ids(self, window: Sequence[int]) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a window of items: every item's code and separator is learned, then the end of
        the turn; the context and the placeholders are not."""
        ids, labels = self._history_ids(window, close_last=False)
        return self.context + ids + self.end, [IGNORE] * len(self.context) + labels + self.end

    def sample_ids(self, items: Sequence[int], target: int = -1) -> tuple[list[int], list[int], tuple[int, ...]]:
        """(input ids, labels, the items whose states fill the placeholders) of a dense sample: a training window
        (`target` -1: every item learned) or a history with its held-out `target` (only the target learned)."""
        if target < 0:
            ids, labels = self.training_ids(items)
            return ids, labels, tuple(items[:-1])
        history, _ = self._history_ids(items, close_last=True)
        answer = list(self.code_ids(target)) + self.end
        return self.context + history + answer, [IGNORE] * (len(self.context) + len(history)) + answer, tuple(items)

    def distill_points(self, ids: Sequence[int], items: Sequence[int], target: int = -1
                       ) -> tuple[tuple[int, int, int, int], ...]:
        """Where a teacher can say what comes next: (position in `ids` of a code token, placeholder number, code
        level, the item it belongs to) for every code token written right after placeholder k, i.e. each item
        that follows a collaborative state (the window's first item has none). Placeholder k holds the state
        after the first k+1 items, the state the teacher scores that item's next item with."""
        if self.placeholder is None:
            return ()
        # a window: placeholder k precedes item k+1; a held-out sample: only the last one precedes the target
        following = dict(enumerate(items[1:])) if target < 0 else {len(items) - 1: target}
        points, k = [], 0
        for pos, token in enumerate(ids):
            if token != self.placeholder:
                continue
            if k in following:
                code = self.code_ids(following[k])
                points += [(pos + 1 + level, k, level, following[k]) for level in range(len(code))]
            k += 1
        return tuple(points)

    def inference_text(self, history: Sequence[int]) -> str:
        """The prompt text whose continuation is the next item's code (placeholders as their token text)."""
        items = list(history)[-self.builder.max_history:]
        ids, _ = self._history_ids(items, close_last=True)
        return self.context_text + self.tokenizer.decode(ids, skip_special_tokens=False)

    def _mapped(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(placeholder vectors [P, hidden], code additions [P, levels, hidden] or None) of P input vectors
        (`head_states`)."""
        return self.mapper(states), (self.mapper.code_vectors(states) if self.mapper.code_levels else None)

    def inputs(self, histories: Sequence[Sequence[int]]) -> tuple[
            list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None, torch.Tensor | None]:
        """Per history, (the mapped state after each item [n, hidden], the additions on the code tokens after each
        state [n, levels, hidden] or None without `collab_on_codes`, what its last state adds to the last hidden
        state at each code decoding writes [levels, hidden] or None without `collab_head`), and the last states
        [B, collab_dim + head_extra_dim] for the head's prefix MLP (None without one), from one pass of the
        collaborative model (and of each head source)."""
        if self.mapper is None or not histories:
            return [torch.zeros(0) for _ in histories], None, None, None
        states = self.states(histories)
        sizes = [len(s) for s in states]
        full = self.head_states(histories, states)
        vectors, additions = self._mapped(torch.cat(full))
        last = torch.stack([s[-1] for s in full])
        heads = list(self.mapper.logit_vectors(last)) if self.mapper.logit_levels else None
        return (list(vectors.split(sizes)), (None if additions is None else list(additions.split(sizes))), heads,
                last if self.mapper.prefix_width else None)

    def prefix_head(self, last_states: torch.Tensor, present: torch.Tensor) -> PrefixHead:
        """Decoding's handle on the head's prefix MLP for prompts with these last states (rows with `present`
        False, prompts without collaborative tokens, get nothing)."""
        return PrefixHead(self.mapper.prefix_vectors, last_states, present.float())

    def head_vectors(self, states: torch.Tensor, levels: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[P, hidden]: what the collaborative head adds to the last hidden state at P code tokens, each written
        after the head input `states[p]` (`head_states`) at code level `levels[p]` of item `items[p]` (training's
        distill points)."""
        out = self.mapper.logit_vectors(states)[torch.arange(len(levels)), levels]
        if self.mapper.prefix_width:
            codes = torch.tensor([self.code_ids(int(i)) for i in items])
            for level in levels.unique().tolist():
                rows = (levels == level).nonzero().squeeze(1)
                out = out.index_add(0, rows.to(out.device),
                                    self.mapper.prefix_vectors(states[rows], level, codes[rows, :level]))
        return out

    def states(self, histories: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per history (its last max_history items), the collaborative model's own state after each item."""
        return self.source.states_after_each([list(h)[-self.builder.max_history:] for h in histories])

    def head_states(self, histories: Sequence[Sequence[int]], states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The mapper's input after each item, for the prompt's tokens and the head alike: `states` (this class's
        `states` of `histories`), with each head source's state after the same items appended ([n, collab_dim +
        head_extra_dim]); `states` without them."""
        if not self.head_sources:
            return list(states)
        windows = [list(h)[-self.builder.max_history:] for h in histories]
        extra = [source.states_after_each(windows) for source in self.head_sources.values()]
        return [torch.cat([own, *(e[row] for e in extra)], 1) for row, own in enumerate(states)]

    def inference_vectors(self, histories: Sequence[Sequence[int]]) -> CollabInputs:
        """What decoding puts into the model for prompts of these histories (decoding.generate_items)."""
        vectors, additions, heads, last = self.inputs(histories)
        prefix = None if last is None else self.prefix_head(last, torch.ones(len(last)))
        return CollabInputs(self.placeholder, vectors, additions, heads, prefix)

    def embed(self, causal_lm, input_ids: torch.Tensor, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Input embeddings of a training batch; `states[r]` = `self.head_states` of row r's placeholder items (the
        prompt's own states alone where no head source is read)."""
        if self.mapper is None:
            return causal_lm.get_input_embeddings()(input_ids)
        return embed_with_collab(causal_lm, input_ids, self.placeholder, *self._mapped(torch.cat(list(states))))

