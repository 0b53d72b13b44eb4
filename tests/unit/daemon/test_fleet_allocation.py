"""The fleet's allocation rule apart from MQTT: floors first, then water-filling by marginal
tokens/s per watt over the boxes' concave price curves; the sum never exceeds the site budget."""

from __future__ import annotations

import itertools

import pytest

from edgebox.daemon.fleet import BoxView, allocate, box_curve, marginal, predicted_tokens, upper_hull, view_from_telemetry
from edgebox.daemon.telemetry import fleet_fields

# two kinds of box: A is efficient at first, B scales further
A = ((2.0, 10.0), (3.0, 30.0), (5.0, 40.0))  # slopes 20, 5
B = ((3.0, 5.0), (4.0, 20.0), (8.0, 60.0))  # slopes 15, 10


def test_hull_drops_points_under_the_curve_and_past_the_fastest():
    pts = [(2, 10), (2.5, 12), (3, 30), (4, 29), (5, 40), (6, 39), (2, 8)]
    assert upper_hull(pts) == A
    assert upper_hull([]) == ()
    assert upper_hull([(float("nan"), 1.0), (0.0, 3.0)]) == ()


def test_floors_first_then_the_steepest_segments():
    # floors 2 + 3 = 5; 10 W leaves 5 W: A's slope 20 (1 W), B's 15 (1 W), B's 10 (3 W of 4)
    got = allocate({"a": A, "b": B}, 10.0)
    assert got == {"a": 3.0, "b": 7.0}
    # 7 W leaves 2 W: A's 20 then B's 15
    assert allocate({"a": A, "b": B}, 7.0) == {"a": 3.0, "b": 4.0}


def test_the_greedy_split_is_the_best_split_on_a_grid():
    site = 9.5
    got = allocate({"a": A, "b": B}, site)
    best = max((predicted_tokens(A, wa) + predicted_tokens(B, site - wa), wa) for wa in [i / 100 for i in range(200, 701)])
    assert predicted_tokens(A, got["a"]) + predicted_tokens(B, got["b"]) == pytest.approx(best[0], abs=1e-6)


def test_watts_no_curve_can_use_are_spread_so_the_sum_is_the_site_budget():
    got = allocate({"a": A, "b": B}, 20.0)  # tops: 5 + 8 = 13 W, 7 W left over
    assert got == {"a": 8.5, "b": 11.5}
    assert sum(got.values()) == pytest.approx(20.0)


def test_floors_over_the_budget_are_scaled_down():
    got = allocate({"a": A, "b": B}, 4.0)
    assert got == {"a": 1.6, "b": 2.4}


@pytest.mark.parametrize("site", [0.5, 4.9, 5.0, 7.77, 10.0, 13.0, 100.0])
def test_the_sum_never_exceeds_the_site_budget(site):
    curves = {f"box{i}": c for i, c in enumerate(itertools.islice(itertools.cycle([A, B]), 5))}
    got = allocate(curves, site)
    assert set(got) == set(curves)
    assert site - 0.006 <= sum(got.values()) <= site
    assert all(w > 0 for w in got.values())


def test_a_box_gone_gives_its_watts_to_the_others():
    three = allocate({"a": A, "b": B, "c": B}, 15.0)
    two = allocate({"a": A, "b": B}, 15.0)
    assert sum(three.values()) == pytest.approx(15.0) and sum(two.values()) == pytest.approx(15.0)
    assert two["a"] >= three["a"] and two["b"] > three["b"]


def test_bad_site_budget_names_the_field():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="budget"):
            allocate({"a": A}, bad)
    assert allocate({}, 10.0) == {}


def test_marginal_and_prediction_follow_the_segments():
    assert marginal(A, 1.0) == 20.0 and marginal(A, 2.5) == 20.0 and marginal(A, 3.0) == 5.0 and marginal(A, 9.0) == 0.0
    assert predicted_tokens(A, 1.0) == 0.0 and predicted_tokens(A, 4.0) == 35.0 and predicted_tokens(A, 9.0) == 40.0


class _Table:
    """A PowerTable's interface over a small grid (levels x batch): the fleet reads only these."""

    n_levels, max_batch = 3, 2
    _w = {(0, 1): 2.0, (0, 2): 2.4, (1, 1): 3.0, (1, 2): 3.5, (2, 1): 5.0, (2, 2): 6.0}
    _t = {(0, 1): 10.0, (0, 2): 18.0, (1, 1): 15.0, (1, 2): 27.0, (2, 1): 20.0, (2, 2): 36.0}

    def power(self, lv, b):
        return self._w[lv, b]

    def tokens(self, lv, b):
        return self._t[lv, b]


def test_box_curve_and_the_telemetry_fields_round_trip_through_the_controller_view():
    curve = box_curve(_Table())
    assert curve[0] == (2.0, 10.0) and curve[-1] == (6.0, 36.0)
    fields = fleet_fields(_Table(), 3.0)
    assert fields["floor_w"] == 2.0 and fields["marginal_tps_per_w"] == pytest.approx(marginal(curve, 3.0), abs=1e-4)
    view = BoxView("b")
    telemetry = {
        "fleet": fields,
        "budget_w": 3.0,
        "power_w": 2.9,
        "tokens_per_s": 12.0,
        "engine": {"generated_tokens": 100, "energy": {"total_j": 7.0, "idle_j": 2.0}},
    }
    view_from_telemetry(view, telemetry)
    assert view.curve == curve and view.budget_w == 3.0 and view.power_w == 2.9 and view.joules_per_token == 0.05
    assert fleet_fields(None, 3.0) is None


def test_the_shared_fleet_topic_is_a_generate_and_its_replies_may_go_under_fleet_reply():
    from edgebox.daemon.schemas import FLEET_GENERATE, FLEET_SHARED_GENERATE, Topics, reply_topic_problem

    topics = Topics("box-1")
    assert FLEET_SHARED_GENERATE == "$share/edgebox/edgebox/v1/fleet/cmd/generate"
    assert topics.method_of(FLEET_GENERATE) == "generate"
    assert topics.method_of("edgebox/v1/fleet/cmd/cancel") is None  # only generates are shared
    assert reply_topic_problem("edgebox/v1/fleet/reply/client-7", topics) is None
