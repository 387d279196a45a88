"""When the engine runs a model's batch: one pure function of plain numbers (`batch_wait`)."""

from __future__ import annotations

# The quiet time that ends a wait for a fuller batch is the longest of: this many of the latest gaps between two
# arrivals, this fraction of an evaluation (only while answered clients are still to send again), and MIN_QUIET_S
# (a shorter wait costs about as much in wake-ups as it saves). Tuned by measurement: see BENCHMARKS.md.
QUIET_GAPS = 3.0
QUIET_EVALUATION = 0.1
MIN_QUIET_S = 0.25e-3
# Clients are coming back (a closed pool) while at least this share of an evaluation's answered images were sent
# again by the next one's end, in the running mean over evaluations (`came_back`).
COMING_BACK = 0.9


def batch_wait(
    *,
    queued: int,  # images of the model waiting
    max_batch: int,
    idle: bool,  # the device had no work when these images came (else: it has just evaluated a batch)
    answered: int,  # images of the requests the model's latest evaluation ended (0: the latest was another model's)
    returned: int,  # images submitted to the model since that evaluation
    came_back: float,  # the running mean share of answered images sent again by the next evaluation's end
    gap: float,  # seconds between the two latest arrivals
    since_arrival: float,  # seconds since the latest arrival
    evaluation_s: float,  # an evaluation's mean duration
    waited: float,  # seconds the engine has waited for this batch so far
    max_wait: float,
) -> float:
    """Seconds the engine still waits before it runs the model's batch; 0 or less: run it now.

    A full batch runs now. Otherwise it depends on what the device was doing:

    idle     Wait for a fuller batch, up to max_wait, but only while images keep coming: the wait ends once none
             came for the quiet time, QUIET_GAPS × the latest gap (at least MIN_QUIET_S). A burst of closed-loop
             clients arrives a request's handling apart and then stops, and waiting out max_wait after it only
             adds latency. While the clients answered by the latest evaluation are not all back (answered >
             returned), the quiet time is also at least QUIET_EVALUATION of an evaluation: next to a long
             evaluation a short pause in their burst is no reason to start a smaller batch. A lone image (the
             gap before it >= max_wait) runs now.
    busy     Right after an evaluation, when it answered at least as many images as were already waiting
             (queued − returned), wait for those clients to send again, until all are back or up to
             max(max_wait, an evaluation). Without this, closed-loop clients that once fell into two groups
             stay in two for good: each group's batch runs while the other is answered, the device never
             idles and never waits, and two half batches serve fewer images/s than one whole one.
             When it answered fewer, wait the same way only while answered clients have been coming back
             (came_back ≥ COMING_BACK). In a mix of 1- and 4-step requests the continuing 4-step images would
             otherwise start the next evaluation at once, and a 1-step request sent meanwhile would wait for
             that evaluation and then its own. Clients that do not come back (each request its own client)
             bring the share down, and then the waiting images run at once.
    """
    if queued >= max_batch:
        return 0.0
    awaited = answered - returned  # answered images not back yet (any submission counts as one coming back)
    if idle:
        if gap >= max_wait:
            return 0.0
        quiet = max(QUIET_GAPS * gap, QUIET_EVALUATION * evaluation_s if awaited > 0 else 0.0, MIN_QUIET_S)
        return min(max_wait - waited, quiet - since_arrival)
    if awaited <= 0 or (answered < max(1, queued - returned) and came_back < COMING_BACK):
        return 0.0
    return max(max_wait, evaluation_s) - waited
