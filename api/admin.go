package api

import (
	"context"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
	"github.com/sluice-dev/sluice/usage"
)

// outcomeLabel names an admission outcome in metrics.
var outcomeLabel = map[scheduler.Outcome]string{
	scheduler.Admitted: "admitted", scheduler.Replay: "replay", scheduler.Conflict: "conflict",
	scheduler.OverQuota: usage.RefusedUserQuota, scheduler.QueueLimit: usage.RefusedQueueLimit,
	scheduler.Overloaded: usage.RefusedOverloaded, scheduler.OverBudget: usage.RefusedBudget,
}

// counted records an admission's outcome: in the metrics, and a refusal
// in its tenant's usage statistics too.
func (s *Server) counted(ctx context.Context, tenant, group string, o scheduler.Outcome) {
	label, ok := outcomeLabel[o]
	if !ok {
		return
	}
	s.d.Metrics.Admission(group, label)
	switch o {
	case scheduler.OverQuota, scheduler.QueueLimit, scheduler.Overloaded, scheduler.OverBudget:
		if s.d.Usage == nil {
			return
		}
		if err := s.d.Usage.Refused(context.WithoutCancel(ctx), group, tenant, label); err != nil {
			s.log.Warn("could not count a refusal in the usage statistics", "tenant", tenant, "reason", label, "err", err)
		}
	}
}

// adminUsage is GET /v1/admin/usage: the usage statistics per tenant, per
// hour (?hours=, default 24) or per day (?days=), as JSON or ?format=csv;
// ?tenant= keeps one tenant, ?top= sets the length of the top-users list.
func (s *Server) adminUsage(c *echo.Context) error {
	if s.d.Usage == nil {
		return &Error{Status: http.StatusServiceUnavailable, Type: "unavailable", Message: "Usage statistics are not kept by this server."}
	}
	ret := s.d.Usage.Retention()
	maxHours, maxDays := int(ret.Hourly/time.Hour), int(ret.Daily/(24*time.Hour))
	g, n := usage.Hour, min(24, maxHours)
	hours, days := c.QueryParam("hours"), c.QueryParam("days")
	switch {
	case hours != "" && days != "":
		return invalid("days", "Give hours or days, not both: hours=24 for the last 24 hours, days=30 for the last 30 days.")
	case days != "":
		v, err := strconv.Atoi(days)
		if err != nil || v < 1 || v > maxDays {
			return invalid("days", "days must be a whole number from 1 to %d (the daily statistics are kept %d days), got %q.", maxDays, maxDays, truncate(days, 32))
		}
		g, n = usage.Day, v
	case hours != "":
		v, err := strconv.Atoi(hours)
		if err != nil || v < 1 || v > maxHours {
			return invalid("hours", "hours must be a whole number from 1 to %d (the hourly statistics are kept %d hours; use days= for longer), got %q.", maxHours, maxHours, truncate(hours, 32))
		}
		n = v
	}
	top := 10
	if t := c.QueryParam("top"); t != "" {
		v, err := strconv.Atoi(t)
		if err != nil || v < 0 || v > 100 {
			return invalid("top", "top must be a whole number from 0 to 100, got %q.", truncate(t, 32))
		}
		top = v
	}
	format := c.QueryParam("format")
	if format != "" && format != "json" && format != "csv" {
		return invalid("format", `format must be "json" or "csv", got %q.`, truncate(format, 32))
	}
	var tenants []string
	for _, t := range s.cfg.Tenants {
		tenants = append(tenants, t.Name)
	}
	if t := c.QueryParam("tenant"); t != "" {
		if _, ok := s.cfg.Tenant(t); !ok {
			return &Error{Status: http.StatusNotFound, Type: "not_found", Message: "There is no tenant named " + strconv.Quote(truncate(t, 64)) + " in the configuration."}
		}
		tenants = []string{t}
	}
	rep, err := s.d.Usage.Query(c.Request().Context(), s.cfg.GroupNames(), tenants, g, n, top)
	if err != nil {
		return err
	}
	if format == "csv" {
		w := c.Response()
		w.Header().Set("Content-Type", "text/csv; charset=utf-8")
		w.Header().Set("Content-Disposition", `attachment; filename="sluice-usage-`+rep.From.Format("2006010215")+"-"+string(g)+`.csv"`)
		w.WriteHeader(http.StatusOK)
		return usage.WriteCSV(w, rep)
	}
	return c.JSON(http.StatusOK, rep)
}

// batchStatus is a group's jobs bound for the Message Batches API.
type batchStatus struct {
	Waiting   int64 `json:"waiting"`
	InBatches int64 `json:"in_batches"`
}

// groupStatus is one model group's live state in GET /v1/admin/status.
type groupStatus struct {
	Group          string  `json:"group"`
	Queued         int64   `json:"queued"`
	ActiveUsers    int64   `json:"active_users"`
	InFlight       int64   `json:"in_flight"`
	MaxConcurrency int     `json:"max_concurrency"`
	Dispatched     float64 `json:"dispatched_last_minute"`
	// The background jobs among Queued and Dispatched (service classes).
	QueuedBackground     int64         `json:"queued_background"`
	DispatchedBackground float64       `json:"dispatched_background_last_minute"`
	FrozenSeconds        float64       `json:"frozen_seconds"`
	Pace                 float64       `json:"pace"`
	HeadersSeenAt        *stamp        `json:"upstream_headers_seen_at"`
	Limits               []limitStatus `json:"limits"`
	// Outage is the group's outage while it is in one (null: healthy);
	// Outages counts the outages it has had.
	Outage  *outageStatus `json:"outage"`
	Outages int64         `json:"outages"`
	Cache   cacheStatus   `json:"cache"`
	// Batch: jobs waiting for a Message Batch and in batches (groups with
	// batch on).
	Batch *batchStatus `json:"batch,omitempty"`
}

// cacheStatus is a model group's prompt-cache use over the last minutes.
type cacheStatus struct {
	// ReadRatio is the share of input read from the cache (null until an
	// answer began in the window).
	ReadRatio      *float64 `json:"read_ratio"`
	InputTokens    int64    `json:"input_tokens"`
	ReadTokens     int64    `json:"read_tokens"`
	CreationTokens int64    `json:"creation_tokens"`
	WindowSeconds  int      `json:"window_seconds"`
	// Held: jobs waiting for another job's call to write a prefix they share.
	Held int64 `json:"held"`
}

// outageStatus is a model group's outage: dispatch stopped because the
// upstream kept failing, and probes test it.
type outageStatus struct {
	Since        stamp   `json:"since"`
	Seconds      float64 `json:"seconds"`
	FailedProbes int64   `json:"failed_probes"`
	Probing      bool    `json:"probing"`
	NextProbeAt  *stamp  `json:"next_probe_at"`
}

type limitStatus struct {
	Dimension string  `json:"dimension"`
	PerMinute float64 `json:"per_minute"` // the limit in force: the lowest of the next two and the upstream's announced one
	// Configured is the configuration's limit; Account the account's, as
	// the Admin API stated it (null: not read, no ANTHROPIC_ADMIN_KEY).
	Configured float64  `json:"configured"`
	Account    *float64 `json:"account"`
	// UsedLastMinute is what went out over the last 60 s (requests
	// dispatched; tokens as the upstream counted them), and InUse that over
	// the limit (may pass 1 briefly: the burst).
	UsedLastMinute float64 `json:"used_last_minute"`
	InUse          float64 `json:"in_use"`
	// BucketFree is what sluice's limiter holds free right now, 0..1.
	BucketFree float64 `json:"bucket_free"`
	// UpstreamInUse is the same from the upstream's last headers; null
	// until a response carried them.
	UpstreamInUse     *float64 `json:"upstream_in_use"`
	UpstreamLimit     *int64   `json:"upstream_limit"`
	UpstreamRemaining *int64   `json:"upstream_remaining"`
}

// redisStatus is the eviction guard's last check in GET /v1/admin/status.
type redisStatus struct {
	// MaxmemoryPolicy is Redis's maxmemory-policy; "" when it cannot be read.
	MaxmemoryPolicy string `json:"maxmemory_policy"`
	// OK: the policy is noeviction; false: Redis evicts keys (accepted jobs
	// can be lost); null: the policy cannot be read.
	OK *bool `json:"ok"`
	// UsedMemoryBytes and MaxmemoryBytes are INFO memory's used_memory and
	// maxmemory (0 = no limit, or not read).
	UsedMemoryBytes int64 `json:"used_memory_bytes"`
	MaxmemoryBytes  int64 `json:"maxmemory_bytes"`
	// Message says why an evicting Redis is a problem and how to fix it.
	Message string `json:"message,omitempty"`
}

// adminStatus is GET /v1/admin/status: each model group's live state
// (queue, users, concurrency, dispatch rate, limiter), and Redis's eviction
// policy and memory, for the dashboard.
func (s *Server) adminStatus(c *echo.Context) error {
	ctx := c.Request().Context()
	out := struct {
		Time       stamp         `json:"time"`
		Groups     []groupStatus `json:"groups"`
		Monitoring string        `json:"monitoring,omitempty"`
		Redis      *redisStatus  `json:"redis,omitempty"`
	}{Time: stamp(s.now()), Groups: []groupStatus{}}
	if s.d.Monitoring != nil {
		out.Monitoring = "/monitoring/"
	}
	if s.d.Guard != nil {
		st := s.d.Guard.Status()
		out.Redis = &redisStatus{MaxmemoryPolicy: st.Policy, UsedMemoryBytes: st.UsedMemory, MaxmemoryBytes: st.MaxMemory, Message: st.Problem()}
		if st.Known() {
			ok := st.OK
			out.Redis.OK = &ok
		}
	}
	for i := range s.cfg.ModelGroups {
		g := &s.cfg.ModelGroups[i]
		st, err := s.d.Scheduler.Gauges(ctx, g)
		if err != nil {
			return err
		}
		gs := groupStatus{Group: g.Name, Queued: st.Queued, ActiveUsers: st.ActiveUsers, InFlight: st.InFlight,
			QueuedBackground: st.QueuedBackground, DispatchedBackground: st.DispatchedBackground,
			MaxConcurrency: g.MaxConcurrency, Dispatched: st.Dispatched, FrozenSeconds: st.Frozen.Seconds(), Pace: st.Pace,
			Outages: st.Outages}
		if g.Batch {
			gs.Batch = &batchStatus{Waiting: st.BatchWaiting, InBatches: st.InBatches}
		}
		if o := st.Outage; o != nil {
			gs.Outage = &outageStatus{Since: stamp(o.Since), Seconds: math.Round(s.now().Sub(o.Since).Seconds()*10) / 10,
				FailedProbes: o.Probes, Probing: o.Probing}
			if !o.Probing && !o.NextProbe.IsZero() {
				next := stamp(o.NextProbe)
				gs.Outage.NextProbeAt = &next
			}
		}
		if !st.HeadersSeen.IsZero() {
			seen := stamp(st.HeadersSeen)
			gs.HeadersSeenAt = &seen
		}
		cs, err := s.d.Scheduler.CacheStats(ctx, g.Name)
		if err != nil {
			return err
		}
		gs.Cache = cacheStatus{InputTokens: cs.InputTokens, ReadTokens: cs.CacheRead, CreationTokens: cs.CacheCreation,
			WindowSeconds: int(cs.Window.Seconds()), Held: cs.Held}
		if r, ok := cs.ReadRatio(); ok {
			r = math.Round(r*1000) / 1000
			gs.Cache.ReadRatio = &r
		}
		xr, xi, xo, err := s.d.Scheduler.AccountLimits(ctx, g.Name)
		if err != nil {
			return err
		}
		configured := map[string]int{"requests": g.RPM, "input_tokens": g.InputTPM, "output_tokens": g.OutputTPM}
		account := map[string]int{"requests": xr, "input_tokens": xi, "output_tokens": xo}
		for _, d := range st.Dimensions {
			l := limitStatus{Dimension: d.Name, PerMinute: d.Limit, UsedLastMinute: d.Used, BucketFree: clamp01(d.Headroom),
				Configured: float64(configured[d.Name])}
			if a := account[d.Name]; a > 0 {
				v := float64(a)
				l.Account = &v
			}
			if d.Limit > 0 {
				l.InUse = math.Round(d.Used/d.Limit*1000) / 1000
			}
			if d.Upstream >= 0 {
				u := math.Round(clamp01(1-d.Upstream)*1000) / 1000
				l.UpstreamInUse = &u
				l.UpstreamLimit, l.UpstreamRemaining = &d.UpstreamLimit, &d.UpstreamRemaining
			}
			gs.Limits = append(gs.Limits, l)
		}
		out.Groups = append(out.Groups, gs)
	}
	return c.JSON(http.StatusOK, out)
}

func clamp01(v float64) float64 { return min(1, max(0, v)) }

// dashboard serves the ops dashboard's files (admin auth).
func (s *Server) dashboard(c *echo.Context) error {
	if s.d.Dashboard == nil {
		return errRouteNotFound
	}
	s.d.Dashboard.ServeHTTP(c.Response(), c.Request())
	return nil
}

// stamp is a time as the API writes it: UTC with exactly three fractional
// digits (jobs.TimeLayout), so every timestamp has the same width.
type stamp time.Time

func (t stamp) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Time(t).UTC().Format(jobs.TimeLayout) + `"`), nil
}
