package redisconn

import (
	"log/slog"
	"sync"
	"time"
)

// Reporter logs a loop's run of failures once: the first failure as a
// warning, then nothing until the loop succeeds again, which is logged with
// how long the run lasted and how many failures it held. A loop that
// retries every few milliseconds while Redis is away thus writes two lines
// per outage, not thousands.
type Reporter struct {
	log  *slog.Logger
	what string

	mu    sync.Mutex
	since time.Time
	n     int
}

// NewReporter reports failures of what (e.g. "dispatch") to log.
func NewReporter(log *slog.Logger, what string) *Reporter {
	return &Reporter{log: log, what: what}
}

// Fail records a failure; the first of a run is logged.
func (r *Reporter) Fail(err error, attrs ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n++
	if r.n > 1 {
		return
	}
	r.since = time.Now()
	r.log.Warn(r.what+" failed; retrying quietly until it works again", append(attrs, "err", err)...)
}

// OK records a success; it ends a run of failures, if any, and logs it.
func (r *Reporter) OK() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == 0 {
		return
	}
	r.log.Info(r.what+" works again", "failures", r.n, "after", time.Since(r.since).Round(time.Millisecond).String())
	r.n = 0
}

// Failing reports whether a run of failures is under way.
func (r *Reporter) Failing() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n > 0
}
