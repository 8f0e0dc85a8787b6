"""What several benchmark sections share: the model they run on and the prompts they time.

    python -c "import sys; sys.path.insert(0, 'benchmarks'); import common; print(common.student_folder('/tmp/x'))"
"""

from __future__ import annotations

from pathlib import Path

from python3_distillation.paths import model_dir

# Eight openings of Austen novels: the prompts every decode-speed section times.
PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "Emma Woodhouse, handsome, clever, and rich,",
    "The family of Dashwood had long been settled in Sussex.",
    "No one who had ever seen Catherine Morland in her infancy",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who",
    "About thirty years ago Miss Maria Ward, of Huntingdon,",
    "She was",
    "Mr. Bennet was among the earliest of those who waited on Mr. Bingley.",
]


def student_folder(workdir: str | Path) -> tuple[Path, str]:
    """The trained v2 student's folder, else a random 6-layer d256 GPT-2 saved under ``workdir``
    (speed does not depend on the weights); with a note saying which."""
    trained = model_dir("v2")
    if (trained / "config.json").is_file():
        return trained, f"trained v2 student ({trained.name})"
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from python3_distillation.tokenizer import load_tokenizer

    out = Path(workdir) / "random-6l-d256"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=256, n_head=4, n_positions=1024, vocab_size=50257)).save_pretrained(out)
    load_tokenizer("gpt2").save_pretrained(out)
    return out, "random 6-layer d256 GPT-2 (no trained v2 yet)"
