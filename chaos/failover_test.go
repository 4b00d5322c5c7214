package chaos

import (
	"fmt"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/proctest"
	"github.com/sluice-dev/sluice/internal/rkeys"
)

// TestSentinelFailover runs sluice (one api, two workers) in redis.mode
// sentinel against a primary, one replica and three sentinels, and SIGKILLs
// the primary: the sentinels promote the replica, and the api and the
// workers must follow it by themselves, with every accepted job ending
// succeeded, none lost and no answer bought twice. redis.wait_replicas 1
// makes each 202 wait until the replica has the job (or wait_timeout).
//
// Two moments: mid-load (a steady stream of 2-second answers, some running,
// some queued), and right after a burst of admissions (the last 202s only
// just written). The burst runs once more with redis.wait_replicas 0, where
// Redis may lose what its replica had not received: its losses and answers
// bought twice are counted and reported, not failed on.
func TestSentinelFailover(t *testing.T) {
	proctest.SluiceBinary(t) // built once, before the clocks start
	const wait1 = "  wait_replicas: 1\n  wait_timeout: 500ms"
	for _, sc := range []struct {
		id       string
		run      func(t *testing.T, c *cluster, l *load) string
		redisCfg string
		measured bool // losses are counted, not failed on
	}{
		{"failover-mid-load", failoverMidLoad, wait1, false},
		{"failover-after-admission", failoverAfterAdmission, wait1, false},
		{"failover-after-admission-wait0", failoverAfterAdmission, "  wait_replicas: 0", true},
	} {
		t.Run(sc.id, func(t *testing.T) {
			r := &result{name: sc.id, lossMeasured: sc.measured}
			start := time.Now()
			c := startCluster(t, sc.id, clusterOpts{Sentinel: true, RedisConfig: sc.redisCfg})
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("process logs, configuration and upstream journal: %s", c.dir)
				}
			})
			l := newLoad(t, c, sc.id, pick(3*time.Minute, 10*time.Minute))
			r.fault = sc.run(t, c, l)
			l.wait()
			l.settle(pick(2*time.Minute, 8*time.Minute))
			l.count(t, r)
			c.logNotes(t, r)
			r.took = time.Since(start)
			t.Logf("%s: accepted %d, succeeded %d, failed %d, lost %d, answers bought twice %d, 503s %d, other 5xx %d (%s)\n  %s\n  notes: %v",
				sc.id, r.accepted, r.succeeded, r.failed, r.lost, r.dup, r.five03, r.fiveXX, secs(r.took), r.fault, r.notes)
		})
	}
}

// fault is a primary's SIGKILL and the promotion that followed.
type fault struct{ killed, promoted time.Time }

// killPrimary SIGKILLs the primary and waits for the sentinels to promote
// the replica; it describes what happened.
func killPrimary(t *testing.T, c *cluster) (f fault, what string) {
	old := c.sent.Primary.Addr
	f.killed = time.Now()
	c.sent.KillPrimary(t)
	took := c.sent.WaitPromoted(t, 60*time.Second)
	f.promoted = time.Now()
	return f, fmt.Sprintf("primary %s SIGKILLed (not restarted); replica %s promoted %s later", old, c.sent.Replica.Addr, secs(took))
}

// followed says when the first 202 came after the promotion: how long the
// api took to follow the new primary.
func followed(l *load, f fault) string {
	first := l.firstAcceptedAfter(f.promoted)
	if first.IsZero() {
		return "no 202 after the promotion"
	}
	return fmt.Sprintf("first 202 %s after the promotion (%s after the kill)", secs(first.Sub(f.promoted)), secs(first.Sub(f.killed)))
}

// failoverMidLoad: a steady load of 2-second answers; the primary is
// SIGKILLed mid-load.
func failoverMidLoad(t *testing.T, c *cluster, l *load) string {
	rate, dur, at := pick(6.0, 10.0), pick(16*time.Second, 45*time.Second), pick(4*time.Second, 10*time.Second)
	sent := make(chan struct{})
	start := time.Now()
	go func() { defer close(sent); l.steady(rate, dur, func(int) int { return 40 }) }()
	time.Sleep(at) // the fault's moment in the load, not a wait for work
	inFlight := c.fakeInFlight()
	faultAt := time.Since(start)
	f, what := killPrimary(t, c)
	<-sent
	l.wait()
	return fmt.Sprintf("%.0f jobs/s for %s (2 s answers); at %s %s; %d upstream calls in flight at the kill; %s",
		rate, secs(dur), secs(faultAt), what, inFlight, followed(l, f))
}

// failoverAfterAdmission: a burst of jobs; the primary is SIGKILLed the
// moment the last 202 arrives, then a few more jobs are sent to the new
// primary.
func failoverAfterAdmission(t *testing.T, c *cluster, l *load) string {
	n := pick(60, 200)
	l.burst(n, 16, func(int) int { return 20 })
	f, what := killPrimary(t, c)
	l.burst(pick(10, 40), 4, func(int) int { return 20 })
	return fmt.Sprintf("%d jobs in a burst (16 clients); the moment the last 202 arrived, %s; then more jobs: %s",
		n, what, followed(l, f))
}

// TestClusterFailover runs sluice (one api, two workers) in redis.mode
// cluster against three primaries with a replica each, and SIGKILLs the
// primary that holds the model group's slot (its fair queue, limiter and
// jobs) mid-load: the cluster promotes its replica, and the api and the
// workers must follow by themselves, with every accepted job ending
// succeeded, none lost and no answer bought twice. redis.wait_replicas 1
// makes each 202 and each job's end wait until the slot's replica has it.
func TestClusterFailover(t *testing.T) {
	proctest.SluiceBinary(t)
	r := &result{name: "cluster-failover"}
	start := time.Now()
	c := startCluster(t, "cluster-failover", clusterOpts{RedisCluster: true,
		RedisConfig: "  wait_replicas: 1\n  wait_timeout: 500ms"})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs, configuration and upstream journal: %s", c.dir)
		}
	})
	l := newLoad(t, c, r.name, pick(3*time.Minute, 10*time.Minute))
	rate, dur, at := pick(6.0, 10.0), pick(16*time.Second, 45*time.Second), pick(4*time.Second, 10*time.Second)
	sent := make(chan struct{})
	loadStart := time.Now()
	go func() { defer close(sent); l.steady(rate, dur, func(int) int { return 40 }) }()
	time.Sleep(at) // the fault's moment in the load, not a wait for work
	inFlight := c.fakeInFlight()
	faultAt := time.Since(loadStart)
	var f fault
	victim := c.redis.Addr
	f.killed = time.Now()
	c.redis.Kill(t)
	c.rc.WaitStateOK(t)
	f.promoted = time.Now()
	now := c.rc.MasterFor(t, rkeys.Limiter("sonnet")).Addr
	<-sent
	l.wait()
	r.fault = fmt.Sprintf("%.0f jobs/s for %s (2 s answers); at %s the primary %s of the group's slot SIGKILLed (not restarted); "+
		"%s took the slot %s later; %d upstream calls in flight at the kill; %s",
		rate, secs(dur), secs(faultAt), victim, now, secs(f.promoted.Sub(f.killed)), inFlight, followed(l, f))
	if now == victim {
		t.Errorf("the slot is still served by the killed primary %s", victim)
	}
	l.settle(pick(2*time.Minute, 8*time.Minute))
	l.count(t, r)
	c.logNotes(t, r)
	r.took = time.Since(start)
	t.Logf("%s: accepted %d, succeeded %d, failed %d, lost %d, answers bought twice %d, 503s %d, other 5xx %d (%s)\n  %s\n  notes: %v",
		r.name, r.accepted, r.succeeded, r.failed, r.lost, r.dup, r.five03, r.fiveXX, secs(r.took), r.fault, r.notes)
}
