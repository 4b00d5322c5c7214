package metrics

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/scheduler"
)

// State collects the fleet's shared state from Redis at scrape time: queue
// depth, active users, in-flight calls and the limiter, per model group.
// Register it in api processes only (every api reports the same values).
type State struct {
	sched  *scheduler.Scheduler
	groups []config.ModelGroup
	log    *slog.Logger

	queued, users, inFlight, dispatched, frozen, pace, limit, used, headroom, upstream, outage, outageSeconds, outages, scrapeErrors *prometheus.Desc
	cacheRatio, cacheHeld                                                                                                            *prometheus.Desc
	classQueued, classDispatched                                                                                                     *prometheus.Desc
	batchJobs                                                                                                                        *prometheus.Desc
}

// NewState returns the collector for groups.
func NewState(sched *scheduler.Scheduler, groups []config.ModelGroup, log *slog.Logger) *State {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(ns, "", name), help, append([]string{"group"}, labels...), nil)
	}
	return &State{sched: sched, groups: groups, log: log,
		queued:      d("queue_jobs", "Jobs waiting in the model group's fair queue."),
		users:       d("queue_active_users", "Users with at least one job waiting in the model group."),
		inFlight:    d("concurrency_in_use", "Concurrency slots taken in the model group, fleet-wide."),
		dispatched:  d("dispatched_last_minute", "Jobs dispatched in the model group over the last 60 seconds, fleet-wide."),
		classQueued: d("queue_class_jobs", "Jobs waiting in the model group's fair queue, by service class.", "class"),
		classDispatched: d("dispatched_class_last_minute",
			"Jobs dispatched in the model group over the last 60 seconds, fleet-wide, by service class.", "class"),
		frozen: d("frozen_seconds", "How long dispatch in the model group stays stopped by an upstream 429 (0 = running)."),
		pace:   d("pace_factor", "The model group's pace after upstream 529s: 1 = full speed."),
		limit:  d("limit_per_minute", "The per-minute limit sluice applies (a lower limit the upstream announced wins).", "dimension"),
		used: d("used_last_minute",
			"What went out in the model group over the last 60 seconds, fleet-wide: requests dispatched, input and output tokens as the upstream counted them.", "dimension"),
		headroom: d("limiter_headroom_ratio",
			"What is free of each per-minute limit, 0..1: source=sluice is sluice's bucket level over its capacity, source=upstream is the last response's remaining over limit.",
			"dimension", "source"),
		upstream:      d("upstream_ratelimit_remaining", "The remaining count the upstream's last anthropic-ratelimit-*-remaining header sent.", "dimension"),
		outage:        d("group_outage", "1 while the model group is in outage (the upstream kept failing: dispatch stopped, probes test it), else 0."),
		outageSeconds: d("group_outage_seconds", "How long the model group's current outage has lasted (0 = healthy)."),
		outages:       d("group_outages_total", "Outages the model group has had."),
		cacheRatio: d("cache_read_ratio",
			"The share of the model group's input tokens the upstream read from its prompt cache, over the last 5 minutes of answers begun, fleet-wide (absent until one began)."),
		cacheHeld:    d("cache_held_jobs", "Jobs the model group's last dispatch round held for another job's call to write a prompt-cache prefix they share."),
		batchJobs:    d("batch_jobs", "The model group's jobs bound for the Message Batches API: state=waiting for a batch, state=in_batch in one being processed.", "state"),
		scrapeErrors: prometheus.NewDesc(ns+"_state_unreadable_groups", "Model groups whose state could not be read from Redis at this scrape.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (s *State) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{s.queued, s.users, s.inFlight, s.dispatched, s.frozen, s.pace, s.limit, s.used, s.headroom, s.upstream, s.outage, s.outageSeconds, s.outages, s.scrapeErrors, s.cacheRatio, s.cacheHeld, s.classQueued, s.classDispatched, s.batchJobs} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (s *State) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	failed := 0
	for i := range s.groups {
		g := &s.groups[i]
		st, err := s.sched.Gauges(ctx, g)
		if err != nil {
			failed++
			s.log.Warn("metrics: could not read a model group's state", "group", g.Name, "err", err)
			continue
		}
		gauge := func(d *prometheus.Desc, v float64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{g.Name}, labels...)...)
		}
		gauge(s.queued, float64(st.Queued))
		gauge(s.users, float64(st.ActiveUsers))
		gauge(s.inFlight, float64(st.InFlight))
		gauge(s.dispatched, st.Dispatched)
		gauge(s.classQueued, float64(st.Queued-st.QueuedBackground), config.ClassInteractive)
		gauge(s.classQueued, float64(st.QueuedBackground), config.ClassBackground)
		gauge(s.classDispatched, max(0, st.Dispatched-st.DispatchedBackground), config.ClassInteractive)
		gauge(s.classDispatched, st.DispatchedBackground, config.ClassBackground)
		if g.Batch || st.BatchWaiting+st.InBatches > 0 {
			gauge(s.batchJobs, float64(st.BatchWaiting), "waiting")
			gauge(s.batchJobs, float64(st.InBatches), "in_batch")
		}
		gauge(s.frozen, st.Frozen.Seconds())
		gauge(s.pace, st.Pace)
		if st.Outage != nil {
			gauge(s.outage, 1)
			gauge(s.outageSeconds, max(0, time.Since(st.Outage.Since).Seconds()))
		} else {
			gauge(s.outage, 0)
			gauge(s.outageSeconds, 0)
		}
		ch <- prometheus.MustNewConstMetric(s.outages, prometheus.CounterValue, float64(st.Outages), g.Name)
		if cs, err := s.sched.CacheStats(ctx, g.Name); err == nil {
			if r, ok := cs.ReadRatio(); ok {
				gauge(s.cacheRatio, r)
			}
			gauge(s.cacheHeld, float64(cs.Held))
		} else {
			s.log.Warn("metrics: could not read a model group's cache figures", "group", g.Name, "err", err)
		}
		for _, dim := range st.Dimensions {
			gauge(s.limit, dim.Limit, dim.Name)
			gauge(s.used, dim.Used, dim.Name)
			gauge(s.headroom, dim.Headroom, dim.Name, "sluice")
			if dim.Upstream >= 0 {
				gauge(s.headroom, dim.Upstream, dim.Name, "upstream")
				gauge(s.upstream, float64(dim.UpstreamRemaining), dim.Name)
			}
		}
	}
	ch <- prometheus.MustNewConstMetric(s.scrapeErrors, prometheus.GaugeValue, float64(failed))
}
