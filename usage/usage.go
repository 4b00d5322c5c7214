// Package usage keeps sluice's usage statistics in Redis, per tenant, per
// hour and per day: requests answered and their tokens, failures, refusals
// by reason, upstream 429s and 529s, latency and wait histograms (fixed
// buckets, so percentiles come from whole counts, not a sample), and each
// user's tokens and requests for the top-users list.
//
// A finished job's figures are bumped in the same atomic step as the job's
// own transition to succeeded or failed (jobs.Transition.Tallies), so the
// statistics equal the sum of the jobs' usage exactly, with any number of
// workers. Refusals and upstream pushback are counted where they happen.
//
// Keys: rkeys.Usage, per model group (in the group's slot, so that a job's
// step bumps them atomically) and tenant, sluice:{tag}:usage:{tenant}:{h|d}:
// {YYYYMMDDHH|YYYYMMDD} (hash), with ":users" (tokens by user) and ":ureq"
// (requests by user) sorted sets beside it; refusals whose group is unknown
// go under group "" (no tag). Each expires after its retention. Reports
// read every group's keys and add them up.
package usage

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/rkeys"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/pricing"
)

// Reasons a job is refused at admission, as counted.
const (
	RefusedUserQuota  = "user_quota"
	RefusedQueueLimit = "queue_limit"
	RefusedOverloaded = "overloaded"
	RefusedBudget     = "budget"
)

// Hash fields.
const (
	fRequests    = "requests"
	fCalls       = "upstream_calls"
	fEstimated   = "estimated_tokens"
	fInput       = "input_tokens"
	fOutput      = "output_tokens"
	fCacheRead   = "cache_read_input_tokens"
	fCacheWrite  = "cache_creation_input_tokens"
	fCost        = "cost_musd"      // what the calls cost, in µ$
	fUnpriced    = "unpriced_calls" // calls of a model the price list lacks
	fFailed      = "failed"
	fUpstream429 = "upstream_429"
	fUpstream529 = "upstream_529"
	fRefused     = "refused_" // + reason
	fLatency     = "lat_"     // + bucket index
	fWait        = "wait_"    // + bucket index
)

// Bounds are the histogram buckets' upper bounds in seconds, for both the
// latency (submitted → answered) and the wait (submitted → first started).
// The last bucket is everything above the last bound.
var Bounds = []float64{0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600}

// Retention is how long statistics are kept.
type Retention struct {
	Hourly time.Duration // per-hour buckets; default 7 days
	Daily  time.Duration // per-day buckets; default 400 days
}

// Recorder records and reads usage statistics.
type Recorder struct {
	rdb    redis.UniversalClient
	ret    Retention
	now    func() time.Time
	prices *pricing.Table
}

// WithPrices makes r cost every upstream call with t (nil: no costs).
func (r *Recorder) WithPrices(t *pricing.Table) *Recorder {
	r.prices = t
	return r
}

// New returns a Recorder; now nil means time.Now.
func New(rdb redis.UniversalClient, r Retention, now func() time.Time) *Recorder {
	if r.Hourly <= 0 {
		r.Hourly = 7 * 24 * time.Hour
	}
	if r.Daily <= 0 {
		r.Daily = 400 * 24 * time.Hour
	}
	if now == nil {
		now = time.Now
	}
	return &Recorder{rdb: rdb, ret: r, now: now}
}

// Retention is what the recorder keeps.
func (r *Recorder) Retention() Retention { return r.ret }

// Granularity is the width of a statistics bucket.
type Granularity string

const (
	Hour Granularity = "hour"
	Day  Granularity = "day"
)

func (g Granularity) width() time.Duration {
	if g == Day {
		return 24 * time.Hour
	}
	return time.Hour
}

func (g Granularity) start(t time.Time) time.Time {
	t = t.UTC()
	if g == Day {
		return time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
	}
	return t.Truncate(time.Hour)
}

func key(group, tenant string, g Granularity, t time.Time) string {
	t = t.UTC()
	if g == Day {
		return rkeys.Usage(group, tenant, "d", t.Format("20060102"))
	}
	return rkeys.Usage(group, tenant, "h", t.Format("2006010215"))
}

func (r *Recorder) ttl(g Granularity) time.Duration {
	// One bucket longer than kept: the oldest bucket asked for is whole.
	if g == Day {
		return r.ret.Daily + 24*time.Hour
	}
	return r.ret.Hourly + time.Hour
}

// bucketOf is the index of the histogram bucket that holds d.
func bucketOf(d time.Duration) int {
	s := d.Seconds()
	for i, b := range Bounds {
		if s <= b {
			return i
		}
	}
	return len(Bounds)
}

// Finished is what a job that ended contributes: one answered or one
// failed job, and how long it took. Its tokens are counted per upstream
// call (Call), as the upstream bills them.
type Finished struct {
	Group, Tenant, UserID string
	Succeeded             bool
	Latency               time.Duration
	// Wait is submitted → first start; negative when the job never started.
	Wait time.Duration
	At   time.Time // when it finished
}

// Tallies are the counters a finished job bumps, for its transition to
// apply atomically.
func (r *Recorder) Tallies(f Finished) []jobs.Tally {
	var out []jobs.Tally
	for _, g := range []Granularity{Hour, Day} {
		k, ttl := key(f.Group, f.Tenant, g, f.At), r.ttl(g)
		if !f.Succeeded {
			out = append(out, jobs.Tally{Key: k, Field: fFailed, By: 1, TTL: ttl})
			continue
		}
		out = append(out,
			jobs.Tally{Key: k, Field: fRequests, By: 1, TTL: ttl},
			jobs.Tally{Key: k, Field: fmt.Sprint(fLatency, bucketOf(f.Latency)), By: 1, TTL: ttl},
			jobs.Tally{Key: k + ":ureq", Field: f.UserID, Sorted: true, By: 1, TTL: ttl})
		if f.Wait >= 0 {
			out = append(out, jobs.Tally{Key: k, Field: fmt.Sprint(fWait, bucketOf(f.Wait)), By: 1, TTL: ttl})
		}
	}
	return out
}

// Call is one upstream call of a job that reached the upstream, whatever
// came of it (an answer, an error status, a stream cut short), with the
// tokens the upstream counted for it.
type Call struct {
	Group, Tenant, UserID string
	// JobID and Model are the job the call ran for and the model it asked
	// for: the call's cost is added to the job's record, at the model's price.
	JobID, Model string
	// Batch: the call went through the Message Batches API (its discount).
	Batch bool
	Usage jobs.Usage
	// Estimated is how many of Usage's tokens are sluice's estimate, not
	// the upstream's report: the call was cut before the upstream said
	// (the output of a stream cut mid-answer is estimated from its text;
	// the input of a call cut before message_start from the request).
	Estimated int
	At        time.Time
}

// Price is model's price, and whether the price list has it.
func (r *Recorder) Price(model string) (pricing.Price, bool) { return r.prices.Lookup(model) }

// Cost is what a call of model with usage u costs in µ$, and whether the
// price list has model's price.
func (r *Recorder) Cost(model string, u jobs.Usage, batch bool) (int64, bool) {
	p, ok := r.prices.Lookup(model)
	if !ok {
		return 0, false
	}
	pu := pricing.Usage{InputTokens: u.InputTokens, OutputTokens: u.OutputTokens,
		CacheWriteTokens: u.CacheCreationInputTokens, CacheReadTokens: u.CacheReadInputTokens, Batch: batch}
	if u.CacheCreation != nil {
		pu.CacheWrite1h = u.CacheCreation.Ephemeral1h
	}
	return p.MicroUSD(pu), true
}

// CallTallies are the counters an upstream call bumps, for the transition
// that ends its attempt to apply atomically.
func (r *Recorder) CallTallies(c Call) []jobs.Tally {
	var out []jobs.Tally
	u := c.Usage
	tokens := int64(u.InputTokens + u.OutputTokens + u.CacheReadInputTokens + u.CacheCreationInputTokens)
	cost, priced := r.Cost(c.Model, u, c.Batch)
	if priced && cost != 0 && c.JobID != "" {
		out = append(out, jobs.Tally{Key: jobs.Key(c.JobID), Field: jobs.CostField, By: cost})
	}
	for _, g := range []Granularity{Hour, Day} {
		k, ttl := key(c.Group, c.Tenant, g, c.At), r.ttl(g)
		add := func(field string, n int64) {
			if n != 0 {
				out = append(out, jobs.Tally{Key: k, Field: field, By: n, TTL: ttl})
			}
		}
		add(fCalls, 1)
		add(fInput, int64(u.InputTokens))
		add(fOutput, int64(u.OutputTokens))
		add(fCacheRead, int64(u.CacheReadInputTokens))
		add(fCacheWrite, int64(u.CacheCreationInputTokens))
		add(fEstimated, int64(min(c.Estimated, int(tokens))))
		if tokens > 0 {
			out = append(out, jobs.Tally{Key: k + ":users", Field: c.UserID, Sorted: true, By: tokens, TTL: ttl})
		}
		switch {
		case !priced && tokens > 0:
			add(fUnpriced, 1)
		case cost != 0:
			add(fCost, cost)
			out = append(out, jobs.Tally{Key: k + ":ucost", Field: c.UserID, Sorted: true, By: cost, TTL: ttl})
		}
	}
	return out
}

// Refused counts a refusal at admission (RefusedUserQuota, …) of a job for
// model group ("" when the request named no known model).
func (r *Recorder) Refused(ctx context.Context, group, tenant, reason string) error {
	return r.count(ctx, group, tenant, fRefused+reason)
}

// Upstream counts an upstream 429 or 529 met by one of tenant's jobs of
// model group.
func (r *Recorder) Upstream(ctx context.Context, group, tenant string, status int) error {
	switch status {
	case 429:
		return r.count(ctx, group, tenant, fUpstream429)
	case 529:
		return r.count(ctx, group, tenant, fUpstream529)
	}
	return nil
}

func (r *Recorder) count(ctx context.Context, group, tenant, field string) error {
	now := r.now()
	// Not MULTI: the hour's and the day's keys of no group have no common
	// hash tag (in Redis Cluster they may live on two nodes).
	_, err := r.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, g := range []Granularity{Hour, Day} {
			k := key(group, tenant, g, now)
			p.HIncrBy(ctx, k, field, 1)
			p.Expire(ctx, k, r.ttl(g))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("usage: count %s: %w", field, err)
	}
	return nil
}
