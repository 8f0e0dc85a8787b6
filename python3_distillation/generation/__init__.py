"""Text generation for the teacher and the students: one batched decode loop, shared by the CLI and the server.

    HF_HUB_OFFLINE=1 python -c "from python3_distillation.generation import Generator, SamplingParams as P; \
g = Generator.from_pretrained('python3_distillation/gpt2_student_v2'); print(g.generate(['It is'], P(seed=1))[0].text)"
"""

from python3_distillation.generation.generator import (  # noqa: F401
    Completion, DecodeBatch, Generator, RowInput, StreamEvent, complete_rows)
from python3_distillation.generation.sampling import GenerationError, SamplingParams  # noqa: F401
