from tests.support.harness import spawn


def test_torch_backend_allreduce_avg():
    out = spawn("tests.cases.smoke:allreduce_case", 3)
    assert out == [[2.0] * 5] * 3
