"""`pdpush bench wire` times what pdpush sends and reads, not a stand-in: the body it encodes is
the one P's guard reads back to the same signed target."""

import json
import re

from pdpush.bench.wire import cells, job
from pdpush.cli import main
from pdpush.connector.auth import Keys
from pdpush.connector.auth_middleware import params_of
from pdpush.connector.metadata import PushTarget
from pdpush.rpc.prefill_client import encode_job


def test_the_encoded_body_carries_the_signed_target_and_both_ways_agree():
    j = job(300)
    assert PushTarget.from_params(params_of(encode_job(j)), Keys(b"k" * 32)).d_block_ids == tuple(range(19))
    (enc, enc_json), (guard, guard_json) = cells(300).values()
    assert json.loads(enc()) == json.loads(enc_json())  # the same body, two encoders
    assert guard() == guard_json()  # the same target, two decoders
    assert PushTarget.from_params(guard(), Keys(b"k" * 32)) is not None


def test_prints_one_row_per_length_and_step_with_a_ratio(capsys):
    assert main(["bench", "wire", "--tokens", "10,20", "--repeats", "1", "--number", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1:3] for row in rows] == [
        [" 10 ", " D encodes do_prefill "], [" 10 ", " P's guard reads the target "],
        [" 20 ", " D encodes do_prefill "], [" 20 ", " P's guard reads the target "]]
    assert all(re.search(r"\| [\d.]+x \|$", row) for row in rows)
