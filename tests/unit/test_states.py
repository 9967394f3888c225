import pytest

from parvisor.errors import StateError
from parvisor.model.states import ACTIONS, TRANSITIONS, VmState, check_action, check_transition


def test_every_state_has_a_transition_entry():
    assert set(TRANSITIONS) == set(VmState)


def test_action_in_wrong_state_names_current_and_allowed_states():
    with pytest.raises(StateError) as caught:
        check_action("pause", VmState.OFF, vm="web1")
    error = caught.value
    assert error.details["current_state"] == "off"
    assert "running" in error.details["allowed_states"]
    assert "web1" in error.message and "it is off" in error.message
    assert error.http_status == 409


def test_no_op_transition_is_refused():
    for state in VmState:
        with pytest.raises(StateError):
            check_transition(state, state)


@pytest.mark.parametrize("action,state", [("start", VmState.OFF), ("start", VmState.SAVED),
                                          ("restore", VmState.SAVED),
                                          ("shutdown", VmState.RUNNING),
                                          ("turn-off", VmState.SAVED),
                                          ("delete", VmState.OFF)])
def test_allowed_actions(action, state):
    check_action(action, state)


@pytest.mark.parametrize("action,state", [("restore", VmState.OFF), ("resume", VmState.RUNNING),
                                          ("delete", VmState.RUNNING),
                                          ("edit", VmState.RUNNING), ("exec", VmState.OFF)])
def test_refused_actions(action, state):
    with pytest.raises(StateError):
        check_action(action, state)


def test_actions_only_name_known_states():
    for states in ACTIONS.values():
        assert states <= set(VmState)
