import pytest

from orchestrator.request_class import RequestClass, parse_request_class, vllm_priority


def test_absent_class_is_online():
    assert parse_request_class(None) is RequestClass.ONLINE


@pytest.mark.parametrize("value", ["online", "offline"])
def test_known_classes_parse(value):
    assert parse_request_class(value).value == value


@pytest.mark.parametrize("value", ["Online", "batch", "", 1, ["offline"]])
def test_unknown_class_is_rejected_with_the_choices(value):
    with pytest.raises(ValueError, match="'online', 'offline'"):
        parse_request_class(value)


def test_online_runs_before_offline_in_vllm_priority_order():
    # vLLM's priority scheduler runs the lower value first.
    assert vllm_priority(RequestClass.ONLINE) < vllm_priority(RequestClass.OFFLINE)
