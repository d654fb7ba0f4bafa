"""Every invalid call raises a ValueError that names the argument and shows the shapes."""

import numpy as np
import pytest

import selfattn


def arrays(B=1, H=4, H_kv=2, T=5, S=7, D=8, Dv=None, dtype=np.float32):
    z = np.zeros
    return z((B, H, T, D), dtype), z((B, H_kv, S, D), dtype), z((B, H_kv, S, Dv or D), dtype)


q, k, v = arrays()

CASES = [
    ("rank", (q[0, 0], k[0, 0], v[0, 0]), {}, r"q must be \(B, H, T, D\).*\(5, 8\)"),
    ("ranks differ", (q, k[0], v[0]), {}, r"same rank.*\(1, 4, 5, 8\)"),
    ("dtype int", (q.astype(int), k, v), {}, r"q dtype must be float16, float32 or float64"),
    ("dtypes differ", (q, k.astype(np.float64), v), {}, r"share one dtype"),
    ("batch", (*arrays(B=2)[:1], k, v), {}, r"batch sizes differ"),
    ("D", (q, *arrays(D=16)[1:]), {}, r"head dim D.*\(1, 4, 5, 8\).*\(1, 2, 7, 16\)"),
    ("k/v S", (q, k, arrays(S=9)[2]), {}, r"k and v must agree.*\(1, 2, 9, 8\)"),
    ("H multiple", (q, *arrays(H_kv=3)[1:]), {}, r"H \(4\) must be a multiple of H_kv \(3\)"),
    ("mask broadcast", (q, k, v), dict(mask=np.ones((5, 6), bool)),
     r"mask of shape \(5, 6\) does not broadcast to \(B, H, T, S\) = \(1, 4, 5, 7\)"),
    ("mask too big", (q, k, v), dict(mask=np.ones((3, 4, 5, 7), bool)), r"does not broadcast"),
    ("mask dtype", (q, k, v), dict(mask=np.ones((5, 7), np.int32)), r"mask must be bool"),
    ("mask nan", (q, k, v), dict(mask=np.full((5, 7), np.nan)), r"NaN or \+inf"),
    ("window 0", (q, k, v), dict(window=0), r"window must be >= 1"),
    ("window -3", (q, k, v), dict(window=-3), r"window must be >= 1"),
    ("window pair", (q, k, v), dict(window=(2, -5)), r"window right side"),
    ("window type", (q, k, v), dict(window="big"), r"window must be an int"),
    ("softcap 0", (q, k, v), dict(softcap=0), r"softcap must be a finite number > 0"),
    ("softcap -1", (q, k, v), dict(softcap=-1.0), r"softcap"),
    ("scale nan", (q, k, v), dict(scale=float("nan")), r"scale must be a finite number"),
    ("impl", (q, k, v), dict(impl="cuda"), r"impl must be one of"),
    ("empty", (*arrays(T=0)[:1], k, v), {}, r"empty dimension"),
    ("kv_len 0", (q, k, v), dict(kv_len=0), r"kv_len must be an int in 1 \.\. S = 7"),
    ("kv_len > S", (q, k, v), dict(kv_len=8), r"kv_len must be an int in 1 \.\. S = 7"),
    ("kv_len float", (q, k, v), dict(kv_len=3.0), r"kv_len"),
    ("not an array", ("abc", k, v), {}, r"q must be \(B, H, T, D\).*got shape \(\)"),
]


@pytest.mark.parametrize("name,args,kwargs,message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["reference", "flash", "decode"])
def test_invalid_call_raises_value_error(name, args, kwargs, message, impl):
    kwargs = {"impl": impl, **kwargs}
    with pytest.raises(ValueError, match=message):
        selfattn.attention(*args, **kwargs)


def test_merge_errors():
    out = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="at least one"):
        selfattn.merge([])
    with pytest.raises(ValueError, match="disagree"):
        selfattn.merge([(out, np.zeros((2, 4)))])
    with pytest.raises(ValueError, match="differs from part 0"):
        selfattn.merge([(out, np.zeros((2, 3))), (np.zeros((2, 5, 4)), np.zeros((2, 5)))])
    with pytest.raises(ValueError, match="pair"):
        selfattn.merge([out])
