import pytest
import torch

from fedmri.server.fedavg import weighted_average


def test_weighted_mean_matches_manual_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    states = [({"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen),
                "steps": torch.tensor(7)}, float(n)) for n in (1, 3, 6)]
    avg = weighted_average(states)
    total = 10.0
    for key in ("w", "b"):
        expected = sum(s[key].double() * n / total for s, n in states)
        torch.testing.assert_close(avg[key].double(), expected, rtol=1e-6, atol=1e-6)
        assert avg[key].dtype == torch.float32
    assert int(avg["steps"]) == 7  # integer buffers are carried, not averaged


def test_single_hospital_is_identity() -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.testing.assert_close(weighted_average([(state, 5.0)])["w"], state["w"])


@pytest.mark.parametrize("states, message", [
    ([], "no hospital"),
    ([({"w": torch.ones(2)}, 0.0)], "example count"),
    ([({"w": torch.ones(2)}, 1.0), ({"v": torch.ones(2)}, 1.0)], "layouts"),
])
def test_refuses_bad_input(states, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        weighted_average(states)
