package worker

import "time"

// SetBatchClaimCheck shortens the wait before an unrecorded batch claim is
// looked for upstream, for a test; the returned func restores it.
func SetBatchClaimCheck(d time.Duration) (restore func()) {
	old := batchClaimCheck
	batchClaimCheck = d
	return func() { batchClaimCheck = old }
}
