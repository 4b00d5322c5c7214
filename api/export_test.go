package api

// SetFallbackAdmitted makes f run after each fallback admission, before
// its Idempotency-Key is recorded in the requested group; nil removes it.
func SetFallbackAdmitted(f func()) {
	if f == nil {
		fallbackAdmitted.Store(nil)
		return
	}
	fallbackAdmitted.Store(&f)
}
