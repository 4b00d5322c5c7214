// Package metrics is sluice's Prometheus instrumentation. Counters and
// histograms live in the process where things happen: admissions in the
// api, upstream calls and tokens in the worker, dispatches in the
// dispatcher (which runs in every worker). The shared state in Redis —
// queue depth, active users, limiter headroom, asynq's queues — is read at
// scrape time by the api only (State), so summing a fleet's series never
// counts it twice. No metric carries a user label: user ids are personal,
// and unbounded.
//
// Every method works on a nil *Metrics (a no-op), so components built
// without metrics need no checks.
package metrics

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const ns = "sluice"

// Metrics holds one process's collectors, on its own registry.
type Metrics struct {
	reg *prometheus.Registry

	admissions *prometheus.CounterVec
	wait       *prometheus.HistogramVec
	latency    *prometheus.HistogramVec
	ttft       *prometheus.HistogramVec
	tokens     *prometheus.CounterVec
	responses  *prometheus.CounterVec
	estimate   *prometheus.HistogramVec
	inFlight   *prometheus.GaugeVec
	finished   *prometheus.CounterVec
	dispatched *prometheus.CounterVec
	fallbacks  *prometheus.CounterVec
	batches    *prometheus.CounterVec
}

// durations are the buckets of the time histograms, in seconds.
var durations = []float64{0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600}

// New returns a process's metrics, with the Go runtime and process
// collectors registered.
func New() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := &Metrics{
		reg: reg,
		admissions: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "admissions_total",
			Help: "Requests to queue a job, by model group and outcome: admitted, replay (same Idempotency-Key), or refused as user_quota, queue_limit, overloaded, conflict."},
			[]string{"group", "outcome"}),
		wait: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "queue_wait_seconds",
			Help: "Time from submission to a job's first upstream call.", Buckets: durations}, []string{"group"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "upstream_duration_seconds",
			Help: "Duration of upstream calls, streaming included, by model group and HTTP status (0 = no complete response: the connection failed or sluice stopped the call).", Buckets: durations},
			[]string{"group", "status"}),
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "upstream_first_token_seconds",
			Help: "Time from sending an upstream call to its first text, by model group and the call's final status.", Buckets: durations},
			[]string{"group", "status"}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "tokens_total",
			Help: "Tokens the upstream reported for answered jobs, by model group and kind: input, output, cache_read, cache_write."},
			[]string{"group", "kind"}),
		responses: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "upstream_responses_total",
			Help: "Upstream calls by model group and HTTP status (429 = rate limited, 529 = overloaded, 0 = no complete response: the connection failed or sluice stopped the call)."},
			[]string{"group", "status"}),
		estimate: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "input_estimate_ratio",
			Help:    "Actual input tokens over the estimate reserved at admission, per answered job (1 = exact; above 1 = underestimated).",
			Buckets: []float64{0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 1, 1.05, 1.1, 1.2, 1.3, 1.5, 2, 4}}, []string{"group"}),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "upstream_in_flight",
			Help: "Upstream calls running in this process."}, []string{"group"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "jobs_finished_total",
			Help: "Jobs that ended, by model group and status: succeeded, failed, expired, canceled."}, []string{"group", "status"}),
		dispatched: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "dispatched_total",
			Help: "Jobs this process's dispatcher handed to the workers."}, []string{"group"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "fallbacks_total",
			Help: "Jobs admitted into a fallback model group, by the group the request's model belongs to (from), the group that took it (to) and why: on_wait (from's wait was longer than max_wait) or on_outage (from was in outage)."},
			[]string{"from", "to", "reason"}),
	}
	m.batches = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "batch_jobs_total",
		Help: "Jobs sent to the Message Batches API (event created) or whose batch could not be created (create_failed), by model group."},
		[]string{"group", "event"})
	reg.MustRegister(m.admissions, m.wait, m.latency, m.ttft, m.tokens, m.responses, m.estimate, m.inFlight, m.finished, m.dispatched, m.fallbacks, m.batches)
	return m
}

// Register adds collectors (State, asynq's queue collector) to the registry.
func (m *Metrics) Register(cs ...prometheus.Collector) {
	if m == nil {
		return
	}
	m.reg.MustRegister(cs...)
}

// Handler serves the registry in Prometheus's text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// Admission counts a request to queue a job.
func (m *Metrics) Admission(group, outcome string) {
	if m == nil {
		return
	}
	m.admissions.WithLabelValues(group, outcome).Inc()
}

// Fallback counts a job admitted into group to because from could not
// take it, for reason.
func (m *Metrics) Fallback(from, to, reason string) {
	if m == nil {
		return
	}
	m.fallbacks.WithLabelValues(from, to, reason).Inc()
}

// Waited observes a job's wait before its first call.
func (m *Metrics) Waited(group string, d time.Duration) {
	if m == nil {
		return
	}
	m.wait.WithLabelValues(group).Observe(d.Seconds())
}

// Call is one upstream call being measured.
type Call struct {
	m     *Metrics
	group string
	start time.Time
	first time.Duration // 0 = no text yet
}

// Call starts measuring an upstream call; End it once.
func (m *Metrics) Call(group string) *Call {
	if m == nil {
		return nil
	}
	m.inFlight.WithLabelValues(group).Inc()
	return &Call{m: m, group: group, start: time.Now()}
}

// Text marks text arriving; the first marks the time to first token.
func (c *Call) Text() {
	if c == nil || c.first != 0 {
		return
	}
	c.first = max(time.Since(c.start), time.Nanosecond)
}

// End records the call's outcome: the HTTP status (0 = none).
func (c *Call) End(status int) {
	if c == nil {
		return
	}
	st := strconv.Itoa(status)
	c.m.inFlight.WithLabelValues(c.group).Dec()
	c.m.latency.WithLabelValues(c.group, st).Observe(time.Since(c.start).Seconds())
	c.m.responses.WithLabelValues(c.group, st).Inc()
	if c.first > 0 {
		c.m.ttft.WithLabelValues(c.group, st).Observe(c.first.Seconds())
	}
}

// Tokens counts an answered job's usage.
func (m *Metrics) Tokens(group string, input, output, cacheRead, cacheWrite int) {
	if m == nil {
		return
	}
	for kind, n := range map[string]int{"input": input, "output": output, "cache_read": cacheRead, "cache_write": cacheWrite} {
		m.tokens.WithLabelValues(group, kind).Add(float64(n))
	}
}

// Estimate observes actual over estimated input tokens.
func (m *Metrics) Estimate(group string, actual, estimated int) {
	if m == nil || estimated <= 0 {
		return
	}
	m.estimate.WithLabelValues(group).Observe(float64(actual) / float64(estimated))
}

// Finished counts a job that ended with status.
func (m *Metrics) Finished(group, status string) {
	if m == nil {
		return
	}
	m.finished.WithLabelValues(group, status).Inc()
}

// Batch counts n jobs of a batch created (event "created") or not
// ("create_failed").
func (m *Metrics) Batch(group, event string, n int) {
	if m == nil || n == 0 {
		return
	}
	m.batches.WithLabelValues(group, event).Add(float64(n))
}

// Dispatched counts n jobs dispatched.
func (m *Metrics) Dispatched(group string, n int) {
	if m == nil || n == 0 {
		return
	}
	m.dispatched.WithLabelValues(group).Add(float64(n))
}
