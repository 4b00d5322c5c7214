package fakeanthropic

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"
)

// epsilon absorbs float rounding when a bucket is compared with a need, so
// that a request refused "20 s too early" fits exactly 20 s later.
const epsilon = 1e-9

// bucket is a token bucket whose capacity is a per-minute limit and which
// refills continuously at limit/60 per second of the injected clock.
type bucket struct {
	limit float64
	level float64 // may go below zero in realtime OTPM mode
	last  time.Time
}

func newBucket(limit int, now time.Time) *bucket {
	return &bucket{limit: float64(limit), level: float64(limit), last: now}
}

// refill brings the bucket up to now. A clock that goes backwards refills
// nothing until it passes the last reading again.
func (b *bucket) refill(now time.Time) {
	if !now.After(b.last) {
		return
	}
	b.level = math.Min(b.limit, b.level+now.Sub(b.last).Seconds()*b.limit/60)
	b.last = now
}

func (b *bucket) has(need float64) bool { return b.level+epsilon >= need }

// secondsUntil is how long until the bucket holds need, or is full if need
// exceeds its capacity (the request will still not fit then, as upstream).
func (b *bucket) secondsUntil(need float64) float64 {
	need = math.Min(need, b.limit)
	if b.has(need) {
		return 0
	}
	return (need - b.level) * 60 / b.limit
}

func (b *bucket) take(n float64) { b.level -= n }

func (b *bucket) give(n float64) { b.level = math.Min(b.limit, b.level+n) }

// setLimit changes the bucket's per-minute limit at now: the capacity and
// the refill rate. What has been used stays used: the bucket keeps its
// shortfall from full (limit - level), so that a lowered limit bites at
// once and a raised one grants the difference.
func (b *bucket) setLimit(limit int, now time.Time) {
	b.refill(now)
	used := b.limit - b.level
	b.limit = float64(limit)
	b.level = b.limit - used
}

// limitState is what the anthropic-ratelimit-*-{limit,remaining,reset}
// headers of one axis say.
type limitState struct {
	limit     int
	remaining int
	reset     time.Time
}

// state reads the bucket for the headers. Request counts are exact (floor);
// token counts are rounded to the nearest 1,000, never below 0 or above the
// limit. reset is when the bucket is full again, from the unrounded level,
// rounded up to a whole second.
func (b *bucket) state(now time.Time, exact bool) limitState {
	level := math.Max(0, b.level)
	var remaining float64
	if exact {
		remaining = math.Floor(level + epsilon)
	} else {
		remaining = math.Min(b.limit, math.Round(level/1000)*1000)
	}
	full := now.Add(time.Duration((b.limit - b.level) * 60 / b.limit * float64(time.Second)))
	if t := full.Truncate(time.Second); !t.Equal(full) {
		full = t.Add(time.Second)
	}
	return limitState{limit: int(b.limit), remaining: int(remaining), reset: full}
}

// groupState is a group with its buckets. Server.mu guards the buckets.
type groupState struct {
	Group
	requests *bucket // /v1/messages
	input    *bucket
	output   *bucket
	counts   *bucket // /v1/messages/count_tokens, sized like requests
}

func newGroupState(g Group, now time.Time) *groupState {
	return &groupState{
		Group:    g,
		requests: newBucket(g.RPM, now),
		input:    newBucket(g.InputTPM, now),
		output:   newBucket(g.OutputTPM, now),
		counts:   newBucket(g.RPM, now),
	}
}

// setLimits changes the group's limits at now; 0 keeps a limit. The caller
// holds Server.mu.
func (g *groupState) setLimits(rpm, inputTPM, outputTPM int, now time.Time) {
	if rpm > 0 {
		g.RPM = rpm
		g.requests.setLimit(rpm, now)
		g.counts.setLimit(rpm, now)
	}
	if inputTPM > 0 {
		g.InputTPM = inputTPM
		g.input.setLimit(inputTPM, now)
	}
	if outputTPM > 0 {
		g.OutputTPM = outputTPM
		g.output.setLimit(outputTPM, now)
	}
}

func (g *groupState) refill(now time.Time) {
	g.requests.refill(now)
	g.input.refill(now)
	g.output.refill(now)
	g.counts.refill(now)
}

// rateHeaders is the set of anthropic-ratelimit-* headers of one answer.
type rateHeaders struct {
	requests, input, output limitState
	tokens                  limitState // the most restrictive of input and output
}

// headers reads the group's buckets for the headers. The tokens axis is the
// one of input and output with fewer tokens remaining.
func (g *groupState) headers(now time.Time) rateHeaders {
	h := rateHeaders{
		requests: g.requests.state(now, true),
		input:    g.input.state(now, false),
		output:   g.output.state(now, false),
	}
	h.tokens = h.input
	if g.output.level < g.input.level {
		h.tokens = h.output
	}
	return h
}

func (h rateHeaders) write(hdr http.Header) {
	for _, axis := range []struct {
		name string
		st   limitState
	}{
		{"requests", h.requests},
		{"input-tokens", h.input},
		{"output-tokens", h.output},
		{"tokens", h.tokens},
	} {
		writeLimit(hdr, axis.name, axis.st)
	}
}

func writeLimit(hdr http.Header, axis string, st limitState) {
	prefix := "anthropic-ratelimit-" + axis + "-"
	hdr.Set(prefix+"limit", strconv.Itoa(st.limit))
	hdr.Set(prefix+"remaining", strconv.Itoa(st.remaining))
	hdr.Set(prefix+"reset", st.reset.UTC().Format("2006-01-02T15:04:05Z"))
}

// charge is what an admitted request took from its group's buckets.
type charge struct {
	input    int // input tokens + cache writes
	reserved int // output tokens reserved (reserve mode), returned at the end
}

// admit checks req against g's buckets at now and, if it fits, takes one
// request, its input tokens and (reserve mode) max_tokens of output. It
// returns the headers as they stand afterwards, or the 429 to send. The
// caller holds Server.mu.
func (s *Server) admit(g *groupState, inputTokens, maxTokens int, now time.Time) (charge, rateHeaders, *apiError) {
	g.refill(now)
	type axis struct {
		b    *bucket
		need float64
		what string
	}
	axes := []axis{
		{g.requests, 1, fmt.Sprintf("%s requests", commas(g.RPM))},
		{g.input, float64(inputTokens), fmt.Sprintf("%s input tokens", commas(g.InputTPM))},
	}
	if s.cfg.OTPMMode == OTPMReserve {
		axes = append(axes, axis{g.output, float64(maxTokens), fmt.Sprintf("%s output tokens", commas(g.OutputTPM))})
	}
	wait, what := 0.0, ""
	for _, a := range axes {
		if a.b.has(a.need) && a.need <= a.b.limit {
			continue
		}
		if w := a.b.secondsUntil(a.need); what == "" || w > wait {
			wait, what = w, a.what
		}
	}
	if s.cfg.OTPMMode == OTPMRealtime && g.output.level <= epsilon {
		// Realtime mode refuses while the output bucket is empty or in debt.
		if w := (epsilon - g.output.level) * 60 / g.output.limit; what == "" || w > wait {
			wait, what = w, fmt.Sprintf("%s output tokens", commas(g.OutputTPM))
		}
	}
	if what != "" {
		return charge{}, g.headers(now), rateLimited(what, wait)
	}
	c := charge{input: inputTokens}
	g.requests.take(1)
	g.input.take(float64(inputTokens))
	if s.cfg.OTPMMode == OTPMReserve {
		c.reserved = maxTokens
		g.output.take(float64(maxTokens))
	}
	return c, g.headers(now), nil
}

// rateLimited is the 429 for a full bucket, worded like the API's.
func rateLimited(what string, waitSeconds float64) *apiError {
	return &apiError{
		status: http.StatusTooManyRequests,
		typ:    typeRateLimit,
		message: "This request would exceed the rate limit for your organization (fake-anthropic) of " + what +
			" per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the " +
			"response headers for current usage. Please reduce the prompt length or the maximum tokens requested, " +
			"or try again later.",
		retryAfter:  retryAfterSeconds(waitSeconds),
		shouldRetry: "true",
	}
}

// retryAfterSeconds rounds a wait up to whole seconds, at least 1.
func retryAfterSeconds(seconds float64) int {
	return max(1, int(math.Ceil(seconds-epsilon)))
}

// commas formats n with thousands separators: 30000 → "30,000".
func commas(n int) string {
	s := strconv.Itoa(n)
	if n < 0 {
		return "-" + commas(-n)
	}
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
