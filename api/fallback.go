package api

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync/atomic"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// Model fallback: a request whose model group refuses it as overloaded
// (its wait is longer than the tenant's max_wait) or unavailable (its
// outage outlasted upstream.max_outage) is admitted into another group
// when the tenant's rule for the group says so (tenants[].fallbacks) and
// the request did not turn fallback off. The fallbacks are tried in order;
// each is a full admission in its own group (fairness, queue cap, wait
// limit, quotas and budgets there, priced at its model), after the refusal
// gave back what the first admission held. A job that fell back runs on
// the fallback's model and records the model asked for.

// fallbackHeader is how a /v1/messages request chooses its fallback
// (the body is the Messages API's own): false, true, or a comma-separated
// order of model groups or models.
const fallbackHeader = "sluice-fallback"

// fallbackReason is the reason a refusal gives to fall back.
func fallbackReason(o scheduler.Outcome) string {
	if o == scheduler.Unavailable {
		return config.FallbackOnOutage
	}
	return config.FallbackOnWait
}

// fallbacks are the groups a request refused for reason may fall back to,
// in order: the request's own order (under the tenant's rule's reasons
// when the tenant has a rule for the group, else for either reason), or
// the tenant's rule's; none when the request turned fallback off.
func (s *Server) fallbacks(tenant *config.Tenant, req *createRequest, reason string) []fallbackTarget {
	if req.NoFallback {
		return nil
	}
	rule, ok := tenant.FallbackFor(req.Group.Name)
	if ok && !rule.On(reason) {
		return nil
	}
	if req.FallbackOrder != nil {
		return req.FallbackOrder
	}
	if !ok {
		return nil
	}
	out := make([]fallbackTarget, 0, len(rule.To))
	for _, name := range rule.To {
		if g, model, err := s.cfg.FallbackTarget(name); err == nil { // checked at load
			out = append(out, fallbackTarget{Group: g, Model: model})
		}
	}
	return out
}

// fallback admits the request into its first fallback that takes it,
// after its own group refused it with refused. ok reports that one
// decided (admitted, or an Idempotency-Key's replay or conflict there):
// job and res are then that admission's. When every fallback refuses, or
// none applies, ok is false and the first refusal stands.
func (s *Server) fallback(c *echo.Context, tenant *config.Tenant, policy config.UserPolicy, req *createRequest, refused scheduler.AdmitResult, idemKey, hash string) (job *jobs.Job, res scheduler.AdmitResult, ok bool, err error) {
	reason := fallbackReason(refused.Outcome)
	log := s.log.With("tenant", tenant.Name, "user_id", req.UserID, "requested_model", req.Model, "fallback_reason", reason)
	for _, t := range s.fallbacks(tenant, req, reason) {
		job, res, ok, err = s.tryFallback(c, tenant, policy, req, t, reason, idemKey, hash, log)
		if ok || err != nil {
			return job, res, ok, err
		}
	}
	return nil, refused, false, nil
}

// tryFallback admits the request into fallback t; ok reports that t
// decided it (as fallback does). A request that cannot run there, or a
// refusal there, is logged and leaves the next fallback to try.
func (s *Server) tryFallback(c *echo.Context, tenant *config.Tenant, policy config.UserPolicy, req *createRequest, t fallbackTarget, reason, idemKey, hash string, log *slog.Logger) (*jobs.Job, scheduler.AdmitResult, bool, error) {
	var none scheduler.AdmitResult
	freq := *req
	freq.Group, freq.Model = t.Group, t.Model
	var err error
	if freq.Request, err = withModel(req.Request, t.Model); err != nil {
		return nil, none, false, err
	}
	input := s.exactInput(c.Request().Context(), &freq)
	ctx, cancel := context.WithTimeout(c.Request().Context(), s.cfg.Redis.Timeout)
	defer cancel()
	a, err := s.admission(ctx, tenant, policy, &freq, input, idemKey, hash)
	if err != nil {
		if _, refusal := err.(*Error); refusal {
			log.Info("fallback skipped: the request cannot run there", "group", t.Group.Name, "model", t.Model, "reason", err)
			return nil, none, false, nil
		}
		return nil, none, false, err
	}
	a.Job.RequestedModel, a.Job.FallbackFrom, a.Job.FallbackReason = req.Model, req.Group.Name, reason
	res, err := s.d.Scheduler.Admit(ctx, a)
	if err != nil {
		return nil, res, false, err
	}
	switch res.Outcome {
	case scheduler.Admitted:
		if h := fallbackAdmitted.Load(); h != nil {
			(*h)()
		}
		// A retry of this request goes to its own group first: there
		// the key now names this job too.
		other, err := s.d.Scheduler.PointIdempotency(ctx, req.Group.Name, tenant.Name, req.UserID, idemKey, a.Job.ID, hash)
		if err != nil {
			log.Warn("could not record the Idempotency-Key in the requested model's group; a retry may be admitted there", "job_id", a.Job.ID, "err", err)
		}
		if other != "" {
			// A retry was admitted in the requested group meanwhile:
			// that job is the request's, and this one is withdrawn.
			return a.Job, s.withdraw(ctx, a.Job, t.Group, other, res), true, nil
		}
		s.d.Metrics.Fallback(req.Group.Name, t.Group.Name, reason)
		return a.Job, res, true, nil
	case scheduler.Replay, scheduler.Conflict:
		return a.Job, res, true, nil
	}
	if label, ok := outcomeLabel[res.Outcome]; ok {
		s.d.Metrics.Admission(t.Group.Name, label)
	}
	log.Info("fallback refused", "group", t.Group.Name, "model", t.Model, "outcome", string(res.Outcome))
	return nil, res, false, nil
}

// withdraw cancels job, just admitted into group g as a fallback, because
// its Idempotency-Key already names job other (a retry admitted in the
// requested group meanwhile), and answers as a replay of other. A job
// that cannot be canceled (it already started) is kept and answered.
func (s *Server) withdraw(ctx context.Context, job *jobs.Job, g *config.ModelGroup, other string, res scheduler.AdmitResult) scheduler.AdmitResult {
	ctx = context.WithoutCancel(ctx)
	stored, err := s.d.Store.Get(ctx, job.ID)
	if err == nil {
		_, err = s.cancel(ctx, stored, g, jobs.Queued)
	}
	if err != nil {
		s.log.Warn("a retry made a second job for one Idempotency-Key, and the fallback job could not be withdrawn",
			"job_id", job.ID, "other_job_id", other, "tenant", job.Tenant, "user_id", job.UserID, "err", err)
		return res
	}
	s.log.Info("fallback job withdrawn: its Idempotency-Key names a job admitted by a retry", "job_id", job.ID, "other_job_id", other,
		"tenant", job.Tenant, "user_id", job.UserID)
	return scheduler.AdmitResult{Outcome: scheduler.Replay, ReplayOf: other}
}

// fallbackAdmitted, when set, runs after a fallback's admission and
// before its Idempotency-Key is recorded in the requested group (tests
// make a retry race the request there).
var fallbackAdmitted atomic.Pointer[func()]

// withModel is a request body with its model replaced.
func withModel(request json.RawMessage, model string) (json.RawMessage, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(request, &m); err != nil {
		return nil, err
	}
	m["model"], _ = json.Marshal(model)
	return json.Marshal(m)
}

// headerFallback reads the sluice-fallback header of a /v1/messages
// request into req: absent or "true", the tenant's rule; "false", none;
// otherwise a comma-separated order of model groups or models.
func headerFallback(c *echo.Context, cfg *config.Config, req *createRequest) error {
	vs := c.Request().Header.Values(fallbackHeader)
	if len(vs) == 0 {
		return nil
	}
	v := strings.TrimSpace(strings.Join(vs, ","))
	switch strings.ToLower(v) {
	case "", "true":
		return nil
	case "false":
		req.NoFallback = true
		return nil
	}
	var names []string
	for _, n := range strings.Split(v, ",") {
		if n = strings.TrimSpace(n); n == "" {
			return invalid(fallbackHeader, "The %s header has an empty entry; give true, false, or model groups or models separated by commas, such as %q.", fallbackHeader, exampleFallback(cfg, req.Group))
		}
		names = append(names, n)
	}
	order, err := fallbackOrder(fallbackHeader, names, cfg, req.Group)
	if err != nil {
		return err
	}
	req.FallbackOrder = order
	return nil
}
