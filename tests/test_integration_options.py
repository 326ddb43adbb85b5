"""The connection options the verl and OpenRLHF integrations share (klservice_client.integrations._connection).

Both modules import without their framework, so their option checks run in the main suite too.
"""

from __future__ import annotations

import pytest

from klservice_client.integrations.openrlhf import KLServiceOptions
from klservice_client.integrations.verl import KLServiceSettings


def verl(**group):
    return KLServiceSettings.from_config({"klservice": group})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: verl(job_id="j"), r"klservice.target: required"),
        (lambda: KLServiceOptions(target=" "), r"klservice.target: required"),
        (lambda: verl(target="h:1", client_cert="c.pem"), r"klservice.client_key: .*go together"),
        (lambda: KLServiceOptions(target="h:1", client_key="k.pem"), r"klservice.client_cert: .*go together"),
        (lambda: verl(target="h:1", timeout=0), r"klservice.timeout: expected a number of seconds > 0, got 0"),
        (lambda: KLServiceOptions(target="h:1", timeout=True), r"klservice.timeout: .*got True"),
        (lambda: verl(target="h:1", tls="yes"), r"klservice.tls: expected true or false"),
        (lambda: verl(target="h:1", port=1), r"klservice.port: unknown key"),
        (lambda: KLServiceOptions(target="h:1", temperature=0.0), r"rollout.temperature: 0.0"),
    ],
)
def test_a_bad_option_is_refused_naming_it(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_both_integrations_make_their_client_from_the_same_options():
    settings = verl(target="h:1", model="smol", timeout=7, job_id=12)  # Hydra may parse a job id as a number
    options = KLServiceOptions(target="h:1", model="smol", timeout=7, job_id="12", temperature=0.7, token="secret")
    assert "secret" not in repr(options)
    for made in (settings.client(), options.client()):
        try:
            assert (made._options.job_id, made._model, made._options.timeout) == ("12", "smol", 7.0)
        finally:
            made.close()
    unnamed = verl(target="h:1").client(default_job_id="experiment-3")  # verl: the experiment name
    try:
        assert unnamed._options.job_id == "experiment-3"
    finally:
        unnamed.close()
