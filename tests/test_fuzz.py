"""Property-based fuzzing of every torchjac function against the autograd oracle (see tests/fuzzing.py).

The default hypothesis profile "short" runs 200 derandomized examples.
The long profile runs 5000 random ones: ``make fuzz``.
"""
from hypothesis import given

import fuzzing


@given(case=fuzzing.cases())
def test_random_models_match_the_oracle(case):
    fuzzing.check(case)
    if case.check_func:
        fuzzing.check_func_jvp(case)
    if case.check_compiled:
        fuzzing.check_compiled(case)
    if case.check_second_order:
        fuzzing.check_second_order(case)
