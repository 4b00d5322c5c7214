package redisconn

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// Waiter runs the scripts whose writes must survive a failover (an
// admission, a job's end): each is followed by WAIT replicas timeout on the
// same connection, so the WAIT waits for that script's writes. (A WAIT sent
// as a call of its own could go to another pooled connection and wait for
// nothing.) Replication stays asynchronous: a WAIT that hears from fewer
// replicas in time does not undo or refuse anything; it is logged, once
// per run of such WAITs, and counted (sluice_redis_wait_short_total).
//
// A nil Waiter, or one with replicas 0, runs the script alone.
type Waiter struct {
	replicas int
	timeout  time.Duration
	log      *slog.Logger
	short    *prometheus.CounterVec

	mu     sync.Mutex
	n      int // WAITs short in the current run
	since  time.Time
	counts map[string]int64 // short WAITs by what
}

// NewWaiter returns a Waiter that asks for replicas replicas within
// timeout; nil when replicas is 0 (no WAIT).
func NewWaiter(replicas int, timeout time.Duration, log *slog.Logger) *Waiter {
	if replicas <= 0 {
		return nil
	}
	return &Waiter{replicas: replicas, timeout: timeout, log: log,
		short: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_redis_wait_short_total",
			Help: "WAITs after writes (a call of admissions, an attempt's start, a job's end) that heard from fewer replicas than redis.wait_replicas within redis.wait_timeout: acknowledged but not yet known to be on a replica.",
		}, []string{"what"}),
	}
}

// Collector is the Waiter's metric, to register; nil for a nil Waiter.
func (w *Waiter) Collector() prometheus.Collector {
	if w == nil {
		return nil
	}
	return w.short
}

// Short is how many WAITs of what came back short so far.
func (w *Waiter) Short(what string) int64 {
	if w == nil {
		return 0
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.counts[what]
}

// Run runs script on c as script.Run does (EVALSHA, then EVAL when Redis
// does not have the script), followed by WAIT on the same connection when
// w asks for replicas; what ("admit", "start", "end") labels a short WAIT. On a
// *redis.ClusterClient both go to the master of keys[0]'s slot; when that
// master is not known or the slot has just moved, the script runs through
// the cluster client without a WAIT, counted as short.
func (w *Waiter) Run(ctx context.Context, c redis.UniversalClient, what string, script *redis.Script, keys []string, args ...any) *redis.Cmd {
	if w == nil {
		return script.Run(ctx, c, keys, args...)
	}
	// on is where the script and its WAIT go: c itself (one connection of
	// a single or Sentinel client), or in a cluster the master of the
	// script's slot. A key-less WAIT sent through a cluster client could
	// go to any node and wait for another master's writes; all of a
	// script's keys share one slot, so keys[0] names its master.
	var on redis.Cmdable = c
	cc, cluster := c.(*redis.ClusterClient)
	if cluster && len(keys) > 0 {
		node, err := cc.MasterForKey(ctx, keys[0])
		if err != nil {
			return w.alone(ctx, cc, what, err, script, keys, args...)
		}
		on = node
	}
	cmd, wait := w.pipeline(ctx, on, func(p redis.Pipeliner) *redis.Cmd { return script.EvalSha(ctx, p, keys, args...) })
	if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
		// Nothing ran: send the script itself (Redis caches it for the
		// next EVALSHA).
		cmd, wait = w.pipeline(ctx, on, func(p redis.Pipeliner) *redis.Cmd { return script.Eval(ctx, p, keys, args...) })
	}
	if cluster && (redis.HasErrorPrefix(cmd.Err(), "MOVED") || redis.HasErrorPrefix(cmd.Err(), "ASK")) {
		// The slot moved (a failover or a resharding) since the client
		// last read its map, and nothing ran. A node client does not
		// follow redirects nor tell the cluster client to read the map
		// again; the cluster client does both. This once, without a WAIT.
		return w.alone(ctx, cc, what, cmd.Err(), script, keys, args...)
	}
	if cmd.Err() == nil { // a script that failed wrote nothing to wait for
		w.observe(what, wait)
	}
	return cmd
}

// alone runs script through the cluster client c, which finds the slot's
// master by itself, without a WAIT: the node to WAIT on is not known (why).
// The missing WAIT counts as short, so the metric and the log say these
// writes are not known to be on a replica.
func (w *Waiter) alone(ctx context.Context, c *redis.ClusterClient, what string, why error, script *redis.Script, keys []string, args ...any) *redis.Cmd {
	cmd := script.Run(ctx, c, keys, args...)
	if cmd.Err() == nil {
		w.observe(what, redis.NewCmdResult(int64(0), fmt.Errorf("no WAIT: the slot's master was not known: %w", why)))
	}
	return cmd
}

// pipeline sends the script call and WAIT as one pipeline: one connection.
// The WAIT's reply is read within the client's read timeout, which the
// configuration keeps above wait_timeout.
func (w *Waiter) pipeline(ctx context.Context, c redis.Cmdable, call func(redis.Pipeliner) *redis.Cmd) (*redis.Cmd, *redis.Cmd) {
	p := c.Pipeline()
	cmd := call(p)
	wait := p.Do(ctx, "wait", w.replicas, w.timeout.Milliseconds())
	_, _ = p.Exec(ctx) // each command keeps its own error
	return cmd, wait
}

// observe counts and reports a WAIT's answer: a run of short ones is
// logged at its start and its end.
func (w *Waiter) observe(what string, wait *redis.Cmd) {
	n, err := wait.Int64()
	w.mu.Lock()
	defer w.mu.Unlock()
	if err == nil && n >= int64(w.replicas) {
		if w.n > 0 {
			w.log.Info("Redis replicas acknowledge writes again", "short_waits", w.n,
				"after", time.Since(w.since).Round(time.Millisecond).String())
			w.n = 0
		}
		return
	}
	w.short.WithLabelValues(what).Inc()
	if w.counts == nil {
		w.counts = map[string]int64{}
	}
	w.counts[what]++
	w.n++
	if w.n == 1 {
		w.since = time.Now()
		attrs := []any{"what", what, "replicas", n, "wanted", w.replicas, "wait_timeout", w.timeout.String()}
		if err != nil {
			attrs = append(attrs, "err", err)
		}
		w.log.Warn("Redis WAIT heard from fewer replicas than redis.wait_replicas: writes are acknowledged "+
			"(jobs accepted) but a failover now could lose them; counting in sluice_redis_wait_short_total, "+
			"logged again when replicas catch up", attrs...)
	}
}
