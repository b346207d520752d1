"""Where a collaborative-token LC-Rec model loses to its teacher, code level by code level.

For held-out users, with the true item's earlier codes written (teacher forcing), at each code level: the
negative log-likelihood of the true code under the LLM and under the teacher (a sequential model's next-item
distribution summed onto the codes under that prefix, distill.CodeTeacher), the KL from teacher to LLM, and how
often their most likely codes agree. Both distributions are over the codes the trie allows there, as in
constrained decoding. A student that loses mostly at level 1 reads the collaborative state badly; one that loses
at later levels carries it badly from the state's position to the code tokens after it. An adapter with a
collaborative head (train.collab_head) is measured with the head's additions, as decoding applies them.

    python bench/level_agreement.py --run-dir RUN [--teachers sasrec=1] [--users 200] [--stage valid]

Prints a table and writes RUN/level_agreement.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcrec_chat.config import load_config  # noqa: E402
from lcrec_chat.distill import CodeTeacher, SequentialTeacher  # noqa: E402
from lcrec_chat.recommender import Recommender  # noqa: E402
from lcrec_chat.run_folder import load_split  # noqa: E402


def parse_teachers(text: str) -> dict[str, float]:
    return {name: float(w) for name, w in (part.split("=") for part in text.split(","))}


@torch.no_grad()
def level_rows(rec: Recommender, teacher: SequentialTeacher, histories: list[list[int]], targets: list[int]
               ) -> list[dict]:
    collab = rec.collab
    codes = CodeTeacher.from_prompts(collab, rec.num_items)
    levels = codes.item_tokens.shape[1]
    sums = [dict(student_nll=0.0, teacher_nll=0.0, kl=0.0, top1_agree=0.0) for _ in range(levels)]
    for history, target in tqdm(list(zip(histories, targets)), desc="users", leave=False):
        ids, _, vector_items = collab.sample_ids(history, target)
        points = collab.distill_points(ids, history, target)
        states = collab.states([vector_items])
        head_in = collab.head_states([vector_items], states)   # the prompt's and the head's input
        embeds = collab.embed(rec.model, torch.tensor([ids]), head_in)
        hidden = rec.model.model(inputs_embeds=embeds).last_hidden_state[0]
        probs = teacher.probabilities([vector_items], {"sasrec": states})[0][-1:]   # after the whole history
        for pos, k, level, item in points:
            tokens, target_probs = codes.targets(probs, torch.tensor([level]), torch.tensor([item]))
            allowed = target_probs[0] > 0
            state = hidden[pos - 1]
            if collab.mapper.logit_levels:   # train.collab_head: what it adds where this code is written
                state = state + collab.head_vectors(head_in[0][k:k + 1], torch.tensor([level]),
                                                    torch.tensor([item]))[0].to(state.dtype)
            logits = rec.model.lm_head(state).float()[tokens[0]]
            student = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            teach = target_probs[0]
            true_slot = int((tokens[0] == ids[pos]).nonzero()[0])
            row = sums[level]
            row["student_nll"] += -float(student[true_slot])
            row["teacher_nll"] += -float(teach[true_slot].clamp_min(1e-12).log())
            row["kl"] += float((teach[allowed] * (teach[allowed].clamp_min(1e-12).log() - student[allowed])).sum())
            row["top1_agree"] += float(int(student.argmax()) == int(teach.argmax()))
    n = len(histories)
    return [{"level": level + 1, **{k: round(v / n, 4) for k, v in row.items()}} for level, row in enumerate(sums)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--teachers", default="sasrec=1", help="name=weight,... of the run's sequential models")
    parser.add_argument("--users", type=int, default=200, help="the first N users")
    parser.add_argument("--stage", default="valid", choices=["valid", "test"])
    args = parser.parse_args()
    cfg = load_config(args.run_dir / "config.yaml")
    rec = Recommender.from_run(cfg, args.run_dir, dtype="fp32")
    if rec.collab is None:
        raise SystemExit(f"{args.run_dir}/adapter was trained without collaborative tokens: nothing to compare")
    teacher = SequentialTeacher.from_run(args.run_dir, parse_teachers(args.teachers),
                                         loaded={"sasrec": rec.collab.source})
    split = load_split(args.run_dir)
    users = split.users[:args.users]
    rows = level_rows(rec, teacher, [split.history(u, args.stage) for u in users],
                      [split.target(u, args.stage) for u in users])
    result = {"run": str(args.run_dir), "teachers": args.teachers, "users": len(users), "stage": args.stage,
              "levels": rows}
    (args.run_dir / "level_agreement.json").write_text(json.dumps(result, indent=1))
    print("| level | LLM NLL of the true code | teacher NLL | KL(teacher, LLM) | top-1 agree |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['level']} | {r['student_nll']:.3f} | {r['teacher_nll']:.3f} | {r['kl']:.3f} | "
              f"{r['top1_agree']:.2f} |")


if __name__ == "__main__":
    main()
