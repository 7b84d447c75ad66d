"""The network compare and its frame streams, on frames built field by field.

What the endpoint of a networked pair decides for each frame of the primary: release it
(the secondary produced the same for that flow), wait, or call a mismatch; and how it
moves TCP segments between the two VMs' sequence spaces with a checksum that still holds.
"""

import pytest
from netframes import CLIENT_IP, GUEST_IP, arp, tcp, tcp_checksum_ok, udp

from colo import netstream as ns
from colo.netcompare import INPUT_WAIT_S, ClientSpace, NetCompare
from colo.netstream import ACK, FIN, PSH, SYN

PA = PSH | ACK


# ---------------------------------------------------------------------- records and parsing
def test_records_split_at_their_boundaries_and_an_incomplete_one_waits():
    first, second = tcp(1, 1, ACK), udp(b"hello")
    stream = ns.record(ns.NO_HEADER, first) + ns.record(b"\x01" + bytes(11), second)
    records, end = ns.split_records(stream + stream[:7])
    assert [(h, f) for _, h, f in records] == [(ns.NO_HEADER, first), (b"\x01" + bytes(11), second)]
    assert end == len(stream) and records[1][0] == 4 + 12 + len(first)
    records, end = ns.split_records(stream, start=records[1][0])
    assert len(records) == 1 and end == len(stream)


@pytest.mark.parametrize("length", [0, 11, ns.MAX_RECORD + 1])
def test_a_record_length_out_of_range_is_refused(length):
    with pytest.raises(ns.RecordError, match=f"announces {length} bytes"):
        ns.split_records(ns.RECORD_HEAD.pack(length) + bytes(40))


def test_parse_names_the_flow_guest_end_first_in_both_directions():
    out = ns.parse(tcp(100, 7, PA, b"abc"), outgoing=True)
    into = ns.parse(tcp(7, 103, ACK, outgoing=False), outgoing=False)
    assert out.key == into.key == (6, GUEST_IP, 80, CLIENT_IP, 40000)
    assert (out.seq, out.ack, out.flags, out.payload_len) == (100, 7, PA, 3)
    assert ns.parse(udp(b"xyz"), outgoing=True).key == (17, GUEST_IP, 53, CLIENT_IP, 40001)
    assert ns.parse(arp(CLIENT_IP), outgoing=True).key is None
    fragment = bytearray(udp(b"xyz"))
    fragment[20] |= 0x20  # more fragments: not something the compare can read by flow
    assert ns.parse(bytes(fragment), outgoing=True).key is None


def test_shift_tcp_moves_seq_ack_and_sack_blocks_and_keeps_the_checksum_right():
    sack = bytes([1, 1, 5, 10]) + (2000).to_bytes(4, "big") + (3000).to_bytes(4, "big")
    frame = bytearray(tcp(0xFFFFFF00, 1000, PA, b"data", options=sack))
    assert tcp_checksum_ok(frame)
    packet = ns.parse(frame, outgoing=True)
    ns.shift_tcp(frame, packet, seq_delta=0x200, ack_delta=-500)
    moved = ns.parse(frame, outgoing=True)
    assert (moved.seq, moved.ack) == (0x100, 500)  # the sequence number wrapped
    assert frame[moved.l4 + 24:moved.l4 + 32] == (1500).to_bytes(4, "big") + (2500).to_bytes(4, "big")
    assert tcp_checksum_ok(frame)


def test_shift_tcp_leaves_a_partial_checksum_alone():
    frame = bytearray(tcp(10, 20, ACK, b"x"))
    before = frame[50:52]
    ns.shift_tcp(frame, ns.parse(frame, outgoing=True), seq_delta=5, checksum_complete=False)
    assert frame[50:52] == before and ns.parse(frame, outgoing=True).seq == 15


# ---------------------------------------------------------------------- the compare
def _established(compare, p_isn=1000, s_isn=1000, client_isn=5000):
    """A connection both VMs accepted: SYN-ACKs seen and the primary's released."""
    compare.secondary_frame(ns.NO_HEADER, tcp(s_isn, client_isn + 1, SYN | ACK))
    syn_ack = tcp(p_isn, client_isn + 1, SYN | ACK)
    assert compare.check_primary(syn_ack) == (True, None)
    compare.released(syn_ack)


def test_tcp_payload_matches_in_sequence_order_whatever_the_segmentation():
    compare = NetCompare()
    _established(compare)
    whole = tcp(1001, 5001, PA, b"A" * 600 + b"B" * 400)
    compare.secondary_frame(ns.NO_HEADER, tcp(1001, 5001, ACK, b"A" * 600))
    assert compare.check_primary(whole) == (False, None)  # the rest is not there yet: wait
    compare.secondary_frame(ns.NO_HEADER, tcp(1601, 5001, PA, b"B" * 400))
    assert compare.check_primary(whole) == (True, None)
    compare.released(whole)
    assert compare.compared_bytes == 1000
    compare.trim_secondary()
    assert not compare.secondary_records  # the clients have all of it in the primary's copy


def test_different_payload_is_a_mismatch_and_names_the_flow():
    compare = NetCompare()
    _established(compare)
    compare.secondary_frame(ns.NO_HEADER, tcp(1001, 5001, PA, b"time=11:00"))
    ok, why = compare.check_primary(tcp(1001, 5001, PA, b"time=11:01"))
    assert not ok and why == "TCP 10.0.2.15:80 <-> 10.0.2.2:40000: payload differs"
    assert compare.check_primary(tcp(1001, 5001, PA, b"time=11:00 and more")) == (False, None)  # so far so good
    ok, why = compare.check_primary(tcp(1001, 5001, PA, b"time=11:01 and more"))
    assert not ok and "payload differs" in why  # the part the secondary has differs already


def test_a_retransmission_of_released_bytes_needs_no_twin():
    compare = NetCompare()
    _established(compare)
    compare.secondary_frame(ns.NO_HEADER, tcp(1001, 5001, PA, b"hello"))
    segment = tcp(1001, 5001, PA, b"hello")
    assert compare.check_primary(segment) == (True, None)
    compare.released(segment)
    compare.trim_secondary()
    assert compare.check_primary(segment) == (True, None)


def test_a_bare_ack_waits_until_the_secondary_acknowledged_as_far():
    compare = NetCompare()
    _established(compare)
    compare.secondary_frame(ns.NO_HEADER, tcp(1001, 5100, ACK))
    assert compare.check_primary(tcp(1001, 5200, ACK)) == (False, None)
    assert compare.check_primary(tcp(1001, 5050, ACK)) == (True, None)
    compare.secondary_frame(ns.NO_HEADER, tcp(1001, 5300, ACK))
    assert compare.check_primary(tcp(1001, 5200, ACK)) == (True, None)


def test_a_fin_must_be_at_the_same_stream_position():
    compare = NetCompare()
    _established(compare)
    compare.secondary_frame(ns.NO_HEADER, tcp(1001, 5001, FIN | ACK, b"bye"))
    assert compare.check_primary(tcp(1001, 5001, FIN | ACK, b"bye")) == (True, None)
    ok, why = compare.check_primary(tcp(1001, 5001, FIN | ACK, b"by"))
    assert not ok and "FIN is at another position" in why


def test_a_connection_opened_between_checkpoints_is_moved_between_the_two_spaces():
    """filter-rewriter's job: the VMs chose other ISNs; the secondary's input gets its
    acknowledgements moved into its space, and its frames are moved back at a takeover."""
    compare = NetCompare()
    _established(compare, p_isn=1000, s_isn=0xFFFFFF00)  # the secondary's space wraps
    delta = (0xFFFFFF00 - 1000) & 0xFFFFFFFF
    client_ack = tcp(5001, 1001 + 10, ACK, outgoing=False)
    moved = compare.input_for_secondary(client_ack)
    assert ns.parse(moved, outgoing=False).ack == (1011 + delta) & 0xFFFFFFFF and tcp_checksum_ok(moved)
    assert compare.input_for_secondary(udp(b"q", outgoing=False)) == udp(b"q", outgoing=False)
    s_data = tcp((1001 + delta) & 0xFFFFFFFF, 5001, PA, b"0123456789")
    compare.secondary_frame(ns.NO_HEADER, s_data)
    assert compare.check_primary(tcp(1001, 5001, PA, b"0123456789")) == (True, None)
    back = compare.release_from_secondary(ns.NO_HEADER, s_data)
    assert ns.parse(back, outgoing=True).seq == 1001 and tcp_checksum_ok(back)


def test_at_a_takeover_the_secondary_frames_the_clients_lack_are_the_ones_given():
    compare = NetCompare()
    _established(compare)
    first, second = tcp(1001, 5001, ACK, b"a" * 100), tcp(1101, 5001, PA, b"b" * 100)
    compare.secondary_frame(ns.NO_HEADER, first)
    compare.secondary_frame(ns.NO_HEADER, second)
    released = tcp(1001, 5001, ACK, b"a" * 100)
    assert compare.check_primary(released) == (True, None)
    compare.released(released)
    compare.trim_secondary()
    assert compare.unreleased_secondary_frames() == [(ns.NO_HEADER, second)]


def test_udp_matches_by_payload_whatever_the_ip_id_and_arp_by_whole_frame():
    compare = NetCompare()
    compare.secondary_frame(ns.NO_HEADER, udp(b"answer", ident=7))
    compare.secondary_frame(ns.NO_HEADER, arp(CLIENT_IP))
    assert compare.check_primary(udp(b"answer", ident=99)) == (True, None)
    ok, why = compare.check_primary(udp(b"answEr", ident=99))
    assert not ok and why == "UDP 10.0.2.15:53 <-> 10.0.2.2:40001: a frame of 14 bytes differs"
    assert compare.check_primary(arp(CLIENT_IP)) == (True, None)
    assert compare.check_primary(udp(b"other", sport=54)) == (False, None)  # a flow the secondary has not used


def test_after_a_checkpoint_both_vms_are_one_state_again():
    compare = NetCompare()
    _established(compare, p_isn=1000, s_isn=9000)
    compare.secondary_frame(ns.NO_HEADER, tcp(9001, 5001, PA, b"ahead"))
    compare.synced()
    assert not compare.secondary_records
    client_ack = tcp(5001, 1001, ACK, outgoing=False)
    assert compare.input_for_secondary(client_ack) == client_ack  # offset 0: the secondary is the primary now
    assert compare.check_primary(tcp(1001, 5001, PA, b"ahead")) == (False, None)  # its old frames are forgotten


def test_after_a_takeover_the_secondary_syn_ack_gives_the_offset_and_its_input_waits_for_it():
    """A connection the primary answered just before it died: the client acknowledges the
    primary's SYN-ACK; the secondary must not see that acknowledgement before its own SYN-ACK
    tells the offset (its kernel would reset the connection), and then sees it moved."""
    compare = NetCompare()
    syn_ack = tcp(1000, 5001, SYN | ACK)
    compare.released(syn_ack, compared=False)  # a checkpoint committed it; the secondary's is still to come
    client_ack = tcp(5001, 1001, ACK, b"GET /", outgoing=False)
    assert compare.input_for_secondary(client_ack, now=10.0) is None
    assert compare.input_for_secondary(client_ack, now=10.2) is None
    s_syn_ack = tcp(7000, 5001, SYN | ACK)
    assert ns.parse(compare.release_from_secondary(ns.NO_HEADER, s_syn_ack), outgoing=True).seq == 1000
    moved = compare.input_for_secondary(client_ack, now=10.3)
    assert ns.parse(moved, outgoing=False).ack == 7001 and tcp_checksum_ok(moved)


def test_the_secondary_input_waits_no_longer_than_its_limit():
    compare = NetCompare()
    compare.released(tcp(1000, 5001, SYN | ACK), compared=False)
    client_ack = tcp(5001, 1001, ACK, outgoing=False)
    assert compare.input_for_secondary(client_ack, now=1.0) is None
    assert compare.input_for_secondary(client_ack, now=1.0 + INPUT_WAIT_S) == client_ack


# ---------------------------------------------------------------------- after a re-protection
def test_a_former_secondary_s_space_stays_the_pair_s_after_it_re_protects():
    """The survivor served a connection in its own space (offset from its SYN-ACK); the pair
    it re-protects is its copy, so the endpoint moves that connection's frames between the
    clients and the pair for good, and a second takeover folds on top of the first."""
    compare = NetCompare()
    _established(compare, p_isn=1000, s_isn=0xFFFFFF00)
    space = ClientSpace()
    space.fold(compare.secondary_offsets())
    delta = (0xFFFFFF00 - 1000) & 0xFFFFFFFF
    client_ack = tcp(5001, 1011, ACK, outgoing=False)
    moved = space.to_vms(client_ack, offset=100)
    assert ns.parse(moved, outgoing=False).ack == (1011 + delta) & 0xFFFFFFFF and tcp_checksum_ok(moved)
    out = space.to_clients(ns.NO_HEADER, tcp((1011 + delta) & 0xFFFFFFFF, 5001, PA, b"more"))
    assert ns.parse(out, outgoing=True).seq == 1011 and tcp_checksum_ok(out)
    assert space.to_vms(udp(b"q", outgoing=False), offset=100) == udp(b"q", outgoing=False)
    assert space.to_clients(ns.NO_HEADER, tcp(7, 9, ACK, sport=81)) == tcp(7, 9, ACK, sport=81)  # another flow
    space.fold({ns.parse(client_ack, outgoing=False).key: 50})  # the next survivor's own offset on top
    assert ns.parse(space.to_clients(ns.NO_HEADER, tcp((1061 + delta) & 0xFFFFFFFF, 5001, ACK)),
                    outgoing=True).seq == 1011


def test_a_new_connection_on_the_same_ports_ends_the_shift():
    compare = NetCompare()
    _established(compare, p_isn=1000, s_isn=3000)
    space = ClientSpace()
    space.fold(compare.secondary_offsets())
    space.from_wire(tcp(9000, 0, SYN, outgoing=False), offset=500)  # the client reuses its port
    old = tcp(5001, 1011, ACK, outgoing=False)
    assert ns.parse(space.to_vms(old, offset=400), outgoing=False).ack == 3011  # input before the SYN: the old one
    assert space.to_vms(old, offset=500) == old
    assert space.to_clients(ns.NO_HEADER, tcp(4000, 9001, SYN | ACK)) == tcp(4000, 9001, SYN | ACK)
    space.forget_below(400)
    assert space
    space.forget_below(501)
    assert not space
