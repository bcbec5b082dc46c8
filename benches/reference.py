"""How far `model.reference=int8` moves the reference: train the demo's SFT stage (to its target
accuracy), then compare the full frozen copy with the int8 one on the held-out prompt + answer
sequences: KL(full || int8) over the vocabulary and the change of each token's log-prob.

    python -m rlfuse.benches.reference [seed]
"""
import sys
import tempfile

import torch

from rlfuse.engine import demo
from rlfuse.engine.model import Reference, char_tokenizer, quiet_transformers


def main(seed: int = 2) -> dict:
    torch.set_num_threads(1)
    quiet_transformers()
    torch.manual_seed(seed)
    tok = char_tokenizer()
    with tempfile.TemporaryDirectory() as out:
        d = demo.DemoConfig(seed=seed, out_dir=out, progress=False)
        train, heldout = demo.addition_task(d.digits, d.n_heldout, d.seed)
        sft = demo.sft_trainer(d, out, tok, train)
        sft.fit(plot=False)
    enc = tok([r["prompt"] + r["answer"] for r in heldout], return_tensors="pt", padding=True)
    with torch.no_grad():
        full, int8 = (Reference(sft.model, mode).copy(**enc).logits.float().log_softmax(-1)[:, :-1]
                      for mode in ("copy", "int8"))
    mask = enc["attention_mask"][:, 1:].bool()
    targets = enc["input_ids"][:, 1:, None]
    dlogp = (full.gather(-1, targets) - int8.gather(-1, targets))[..., 0][mask].abs()
    kl = (full.exp() * (full - int8)).sum(-1)[mask]
    res = {"sft_step": sft.step, "tokens": int(mask.sum()), "kl_mean": kl.mean().item(),
           "kl_max": kl.max().item(), "dlogp_mean": dlogp.mean().item(),
           "dlogp_max": dlogp.max().item()}
    print(f"demo SFT (seed {seed}, step {res['sft_step']}), {res['tokens']} held-out tokens: "
          f"KL(full || int8) mean {res['kl_mean']:.2e}, max {res['kl_max']:.2e}; "
          f"|d log p| mean {res['dlogp_mean']:.2e}, max {res['dlogp_max']:.2e}")
    return res


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
