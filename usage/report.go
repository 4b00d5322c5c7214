package usage

import (
	"cmp"
	"context"
	"encoding/csv"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/pricing"
)

// Stats are the figures of one bucket, or of several added up.
type Stats struct {
	Requests int64 `json:"requests"` // jobs answered
	// UpstreamCalls counts every call that reached the upstream: answers,
	// error answers, calls cut short and retried. The token figures below
	// are those of all of them, as the upstream bills them.
	UpstreamCalls int64 `json:"upstream_calls"`
	// Input tokens as the upstream counts them: uncached, read from the
	// cache, written to the cache.
	InputTokens      int64 `json:"input_tokens"`
	CacheReadTokens  int64 `json:"cache_read_input_tokens"`
	CacheWriteTokens int64 `json:"cache_creation_input_tokens"`
	OutputTokens     int64 `json:"output_tokens"`
	// EstimatedTokens is the part of the token figures that sluice
	// estimated because a call was cut before the upstream reported its
	// usage.
	EstimatedTokens int64 `json:"estimated_tokens"`
	// CostUSD is what the calls cost at the configured prices, in US
	// dollars (exact to the µ$ each call is rounded to); UnpricedCalls the
	// calls of a model the price list lacks, left out of it.
	CostUSD       float64 `json:"cost_usd"`
	UnpricedCalls int64   `json:"unpriced_calls"`
	costMicro     int64
	// AvgTokensPerRequest is every token (input of all three kinds and
	// output) over the requests answered; 0 when none.
	AvgTokensPerRequest float64  `json:"avg_tokens_per_request"`
	Failed              int64    `json:"failed"` // jobs that ended failed
	Refused             Refusals `json:"refused"`
	Upstream429         int64    `json:"upstream_429"`
	Upstream529         int64    `json:"upstream_529"`
	// Latency is submitted → answered, Wait submitted → first started, of
	// the jobs answered: percentiles from the histogram buckets (null when
	// there is no job).
	Latency Percentiles `json:"latency_seconds"`
	Wait    Percentiles `json:"wait_seconds"`

	lat, wait []int64 // histogram counts, len(Bounds)+1
}

// Refusals counts admissions refused, by reason.
type Refusals struct {
	UserQuota  int64 `json:"user_quota"`
	QueueLimit int64 `json:"queue_limit"`
	Overloaded int64 `json:"overloaded"`
	Budget     int64 `json:"budget"`
}

// Percentiles are estimated from histogram buckets (linear within one).
type Percentiles struct {
	P50 *float64 `json:"p50"`
	P95 *float64 `json:"p95"`
}

// Bucket is one hour's or day's Stats.
type Bucket struct {
	Start time.Time `json:"start"`
	Stats
}

// UserUse is one user's part of a period.
type UserUse struct {
	UserID   string  `json:"user_id"`
	Tokens   int64   `json:"tokens"`
	Requests int64   `json:"requests"`
	CostUSD  float64 `json:"cost_usd"`
}

// TenantReport is one tenant's period.
type TenantReport struct {
	Tenant   string    `json:"tenant"`
	Totals   Stats     `json:"totals"`
	Buckets  []Bucket  `json:"buckets"`
	TopUsers []UserUse `json:"top_users"`
}

// Report is a period's statistics: per tenant, and all tenants together.
type Report struct {
	Granularity Granularity    `json:"granularity"`
	From        time.Time      `json:"from"` // start of the first bucket
	To          time.Time      `json:"to"`   // end of the last (the current one, still filling)
	Totals      Stats          `json:"totals"`
	Buckets     []Bucket       `json:"buckets"` // every tenant together
	Tenants     []TenantReport `json:"tenants"`
}

// Query reads the last n buckets of granularity g (the current one
// included) for each tenant, with each tenant's top users by tokens, adding
// up the statistics of the model groups named (and of no group).
func (r *Recorder) Query(ctx context.Context, groups, tenants []string, g Granularity, n, top int) (*Report, error) {
	end := g.start(r.now()).Add(g.width())
	from := end.Add(-time.Duration(n) * g.width())
	rep := &Report{Granularity: g, From: from, To: end, Totals: newStats(), Tenants: []TenantReport{}}
	starts := make([]time.Time, n)
	for i := range starts {
		starts[i] = from.Add(time.Duration(i) * g.width())
		rep.Buckets = append(rep.Buckets, Bucket{Start: starts[i], Stats: newStats()})
	}
	groups = append([]string{""}, groups...)
	// Per tenant, bucket and group a hash; per tenant and group the user
	// sets of all buckets, united where they live (one group's keys share a
	// slot; the keys of no group are read one by one), then added up here.
	p := r.rdb.Pipeline()
	hashes := make([][][]*redis.MapStringStringCmd, len(tenants))
	users := make([][]*redis.ZSliceCmd, len(tenants))
	ureqs := make([][]*redis.ZSliceCmd, len(tenants))
	ucost := make([][]*redis.ZSliceCmd, len(tenants))
	for ti, t := range tenants {
		hashes[ti] = make([][]*redis.MapStringStringCmd, len(starts))
		for _, gr := range groups {
			var uk, rk, ck []string
			for si, s := range starts {
				k := key(gr, t, g, s)
				hashes[ti][si] = append(hashes[ti][si], p.HGetAll(ctx, k))
				uk, rk, ck = append(uk, k+":users"), append(rk, k+":ureq"), append(ck, k+":ucost")
			}
			if gr == "" {
				// No group, no common hash tag: read each key.
				for i := range uk {
					users[ti] = append(users[ti], p.ZRangeWithScores(ctx, uk[i], 0, -1))
					ureqs[ti] = append(ureqs[ti], p.ZRangeWithScores(ctx, rk[i], 0, -1))
					ucost[ti] = append(ucost[ti], p.ZRangeWithScores(ctx, ck[i], 0, -1))
				}
				continue
			}
			users[ti] = append(users[ti], p.ZUnionWithScores(ctx, redis.ZStore{Keys: uk}))
			ureqs[ti] = append(ureqs[ti], p.ZUnionWithScores(ctx, redis.ZStore{Keys: rk}))
			ucost[ti] = append(ucost[ti], p.ZUnionWithScores(ctx, redis.ZStore{Keys: ck}))
		}
	}
	if _, err := p.Exec(ctx); err != nil && err != redis.Nil {
		return nil, fmt.Errorf("usage: query: %w", err)
	}
	sum := func(cmds []*redis.ZSliceCmd) map[string]int64 {
		m := map[string]int64{}
		for _, c := range cmds {
			for _, z := range c.Val() {
				m[fmt.Sprint(z.Member)] += int64(z.Score)
			}
		}
		return m
	}
	for ti, t := range tenants {
		tr := TenantReport{Tenant: t, Totals: newStats(), TopUsers: []UserUse{}}
		for bi, hs := range hashes[ti] {
			st := newStats()
			for _, h := range hs {
				st.add(parse(h.Val()))
			}
			tr.Buckets = append(tr.Buckets, Bucket{Start: starts[bi], Stats: st})
			tr.Totals.add(st)
			rep.Buckets[bi].add(st)
		}
		requests, costs := sum(ureqs[ti]), sum(ucost[ti])
		for u, tokens := range sum(users[ti]) {
			tr.TopUsers = append(tr.TopUsers, UserUse{UserID: u, Tokens: tokens, Requests: requests[u], CostUSD: pricing.USD(costs[u])})
		}
		slices.SortFunc(tr.TopUsers, func(a, b UserUse) int {
			return cmp.Or(cmp.Compare(b.Tokens, a.Tokens), cmp.Compare(b.Requests, a.Requests), strings.Compare(a.UserID, b.UserID))
		})
		if len(tr.TopUsers) > top {
			tr.TopUsers = tr.TopUsers[:top]
		}
		rep.Totals.add(tr.Totals)
		for i := range tr.Buckets {
			tr.Buckets[i].finish()
		}
		tr.Totals.finish()
		rep.Tenants = append(rep.Tenants, tr)
	}
	for i := range rep.Buckets {
		rep.Buckets[i].finish()
	}
	rep.Totals.finish()
	return rep, nil
}

func newStats() Stats {
	return Stats{lat: make([]int64, len(Bounds)+1), wait: make([]int64, len(Bounds)+1)}
}

// counters are the Stats kept as hash fields, by field name.
func (s *Stats) counters() map[string]*int64 {
	return map[string]*int64{
		fRequests: &s.Requests, fCalls: &s.UpstreamCalls, fEstimated: &s.EstimatedTokens,
		fInput: &s.InputTokens, fOutput: &s.OutputTokens,
		fCacheRead: &s.CacheReadTokens, fCacheWrite: &s.CacheWriteTokens, fFailed: &s.Failed,
		fCost: &s.costMicro, fUnpriced: &s.UnpricedCalls,
		fUpstream429: &s.Upstream429, fUpstream529: &s.Upstream529,
		fRefused + RefusedUserQuota: &s.Refused.UserQuota, fRefused + RefusedQueueLimit: &s.Refused.QueueLimit,
		fRefused + RefusedOverloaded: &s.Refused.Overloaded, fRefused + RefusedBudget: &s.Refused.Budget,
	}
}

func parse(h map[string]string) Stats {
	st := newStats()
	counters := st.counters()
	for f, v := range h {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			continue
		}
		if p, ok := counters[f]; ok {
			*p = n
			continue
		}
		for prefix, hist := range map[string][]int64{fLatency: st.lat, fWait: st.wait} {
			if rest, ok := strings.CutPrefix(f, prefix); ok {
				if i, err := strconv.Atoi(rest); err == nil && i >= 0 && i < len(hist) {
					hist[i] = n
				}
			}
		}
	}
	return st
}

func (s *Stats) add(o Stats) {
	theirs := o.counters()
	for f, p := range s.counters() {
		*p += *theirs[f]
	}
	for i := range s.lat {
		s.lat[i] += o.lat[i]
		s.wait[i] += o.wait[i]
	}
}

// finish computes the derived figures.
func (s *Stats) finish() {
	if s.Requests > 0 {
		all := s.InputTokens + s.CacheReadTokens + s.CacheWriteTokens + s.OutputTokens
		s.AvgTokensPerRequest = math.Round(float64(all)/float64(s.Requests)*10) / 10
	}
	s.CostUSD = pricing.USD(s.costMicro)
	s.Latency = Percentiles{P50: quantile(0.5, s.lat), P95: quantile(0.95, s.lat)}
	s.Wait = Percentiles{P50: quantile(0.5, s.wait), P95: quantile(0.95, s.wait)}
}

// quantile estimates the q-quantile of a histogram with upper bounds
// Bounds (and one bucket above them) by linear interpolation inside the
// bucket that holds it, as Prometheus's histogram_quantile does; a
// quantile in the open top bucket is reported as the last bound. nil when
// the histogram is empty.
func quantile(q float64, counts []int64) *float64 {
	var total int64
	for _, c := range counts {
		total += c
	}
	if total == 0 {
		return nil
	}
	rank := q * float64(total)
	var cum int64
	for i, c := range counts {
		if c == 0 || float64(cum+c) < rank {
			cum += c
			continue
		}
		if i == len(Bounds) {
			v := Bounds[len(Bounds)-1]
			return &v
		}
		lo := 0.0
		if i > 0 {
			lo = Bounds[i-1]
		}
		v := lo + (Bounds[i]-lo)*(rank-float64(cum))/float64(c)
		v = math.Round(v*1000) / 1000
		return &v
	}
	v := Bounds[len(Bounds)-1]
	return &v
}

// CSVHeader is the first row of WriteCSV.
var CSVHeader = []string{"start", "tenant", "requests", "upstream_calls", "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
	"output_tokens", "estimated_tokens", "cost_usd", "unpriced_calls", "avg_tokens_per_request", "failed", "refused_user_quota", "refused_queue_limit", "refused_overloaded", "refused_budget",
	"upstream_429", "upstream_529", "latency_p50_seconds", "latency_p95_seconds", "wait_p50_seconds", "wait_p95_seconds"}

// WriteCSV writes one row per tenant per bucket, oldest first.
func WriteCSV(w io.Writer, rep *Report) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(CSVHeader); err != nil {
		return err
	}
	i := func(n int64) string { return strconv.FormatInt(n, 10) }
	f := func(p *float64) string {
		if p == nil {
			return ""
		}
		return strconv.FormatFloat(*p, 'f', -1, 64)
	}
	for bi := range rep.Buckets {
		for _, t := range rep.Tenants {
			b := t.Buckets[bi]
			row := []string{b.Start.Format(time.RFC3339), t.Tenant, i(b.Requests), i(b.UpstreamCalls), i(b.InputTokens), i(b.CacheReadTokens),
				i(b.CacheWriteTokens), i(b.OutputTokens), i(b.EstimatedTokens), strconv.FormatFloat(b.CostUSD, 'f', 6, 64), i(b.UnpricedCalls), strconv.FormatFloat(b.AvgTokensPerRequest, 'f', -1, 64), i(b.Failed),
				i(b.Refused.UserQuota), i(b.Refused.QueueLimit), i(b.Refused.Overloaded), i(b.Refused.Budget), i(b.Upstream429), i(b.Upstream529),
				f(b.Latency.P50), f(b.Latency.P95), f(b.Wait.P50), f(b.Wait.P95)}
			if err := cw.Write(row); err != nil {
				return err
			}
		}
	}
	cw.Flush()
	return cw.Error()
}
