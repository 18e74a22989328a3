"""ZeRO-3 forwards without gradients in a user's own loop: uneven counts are an error, never a hang.

Every ZeRO-3 forward gathers the parameters collectively, so an evaluation loop that gives one rank
one batch more than its peers used to pair that rank's extra forward with a peer's training forward
(or leave it waiting forever). Each forward without gradients now starts with a small check on the
gather group: paired with a peer's training forward, the checked collectives report a mismatch on
both ranks; with a peer gone elsewhere, a timeout names the rank that never arrived. Either way every
error says which rank and what it was doing, and the rule.
"""

import pytest

from tests.support.harness import RankFailure, spawn

pytestmark = pytest.mark.timeout(300)
RULE = "every rank must run the same number of forwards under zero3"


def test_extra_no_grad_forward_then_training_is_an_error_on_every_rank():
    with pytest.raises(RankFailure) as err:
        spawn("tests.cases.zero_forwards:uneven_case", 2, args={"extra_on": 0, "then": "train"}, timeout=120)
    out = err.value.outputs[0]
    assert "UnevenForwardsError" in out and RULE in out, out[-3000:]
    # rank 1 sees the same mismatch in its training gather, unless rank 0 exited before the fingerprints
    # were exchanged (then it saw its peer go away)
    out = err.value.outputs[1]
    assert (RULE in out and "rank 1@" in out) or "PeerDiedError" in out, out[-3000:]
    assert "collective mismatch" in err.value.outputs[0]  # the checked collectives caught it, naming both call sites


def test_extra_no_grad_forward_while_peers_stop_names_the_missing_rank():
    with pytest.raises(RankFailure) as err:
        spawn("tests.cases.zero_forwards:uneven_case", 2, args={"then": "barrier", "timeout": 8.0}, timeout=120)
    out = err.value.outputs[0]
    assert "UnevenForwardsError" in out and RULE in out, out[-3000:]
    assert "ranks that never arrived: 1" in out, out[-3000:]


def test_even_no_grad_forwards_then_training_run_through():
    losses = spawn("tests.cases.zero_forwards:even_case", 2, args={"forwards": 3})
    assert losses[0] == losses[1]
