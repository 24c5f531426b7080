"""Run under torchrun by tests/test_training_loop.py: trains as scripts/train_tokenizer.py does (same flags, after
the dump folder) and then each rank writes its tokenizer state to <dump folder>/rank<i>.safetensors, so the test can
check that the ranks stayed identical.

    python -m torch.distributed.run --nproc_per_node 2 tests/train_and_dump_rank_state.py DUMP_DIR --preset ... --...
"""

import os
import pathlib
import runpy
import sys

from safetensors.torch import save_file

from evotok_hf.training.trainer import TokenizerTrainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(dump_dir: str, argv: list[str]) -> None:
    parse_args = runpy.run_path(str(ROOT / "scripts" / "train_tokenizer.py"), run_name="not_main")["parse_args"]
    trainer = TokenizerTrainer(parse_args(argv))
    trainer.train()
    state = trainer._unwrap(trainer.model).state_dict()
    os.makedirs(dump_dir, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(dump_dir, f"rank{trainer.accelerator.process_index}.safetensors"))  # fmt: skip
    trainer.end()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
