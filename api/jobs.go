package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// createJob is POST /v1/jobs: validate, estimate, then admit in one Lua
// script (idempotency, quotas, queue cap, bounded wait, store, fair queue).
func (s *Server) createJob(c *echo.Context) error {
	tenant := tenantOf(c)
	body, err := s.readBodyFor(c, tenant)
	if err != nil {
		return err
	}
	req, err := parseCreate(body, s.cfg, tenant)
	if err != nil {
		return err
	}
	job, res, err := s.admit(c, tenant, req, body)
	if err != nil {
		return err
	}
	v, err := s.view(c.Request().Context(), job)
	if err != nil {
		return err
	}
	switch {
	case res.Outcome == scheduler.Admitted && res.Batch:
		v.Position, v.ETASeconds, v.WaitReason = nil, nil, waitBatch
	case res.Outcome == scheduler.Admitted:
		v.Position = &res.Position
		setETA(&v, res.ETA)
	default:
		c.Response().Header().Set("Idempotent-Replayed", "true")
	}
	v.Token = jobs.Token(s.d.TokenSecret, job.ID)
	c.Response().Header().Set("Location", "/v1/jobs/"+job.ID)
	return c.JSON(http.StatusAccepted, v)
}

// admit runs admission for a validated request and returns the job it
// stands for: the new one, or (outcome Replay) the one an Idempotency-Key
// named before. Every refusal is an *Error that says what limit and when,
// with the RateLimit-* headers of the user's request quota set.
func (s *Server) admit(c *echo.Context, tenant *config.Tenant, req *createRequest, body []byte) (*jobs.Job, scheduler.AdmitResult, error) {
	var none scheduler.AdmitResult
	idemKey := c.Request().Header.Get("Idempotency-Key")
	if len(idemKey) > 255 {
		return nil, none, invalid("Idempotency-Key", "The Idempotency-Key header is %d characters long; use at most 255.", len(idemKey))
	}
	hash := bodyHash(body)
	policy := tenant.Policy(req.UserID)
	input := s.exactInput(c.Request().Context(), req)
	// Admission's Redis calls share one deadline, so that a Redis that
	// stopped answering costs the client one timeout, not one per call.
	ctx, cancel := context.WithTimeout(c.Request().Context(), s.cfg.Redis.Timeout)
	defer cancel()
	if err := classAllowed(policy, req.Class, classField(c)); err != nil {
		return nil, none, err
	}
	a, err := s.admission(ctx, tenant, policy, req, input, idemKey, hash)
	if err != nil {
		return nil, none, err
	}
	job := a.Job
	// A client that gave up (its request timed out while Redis was away)
	// is not sent a job it will never hear of.
	if err := ctx.Err(); err != nil {
		return nil, none, err
	}
	res, err := s.d.Scheduler.Admit(ctx, a)
	if err != nil {
		return nil, none, err
	}
	group := req.Group.Name
	if res.Outcome == scheduler.Overloaded || res.Outcome == scheduler.Unavailable {
		fjob, fres, ok, err := s.fallback(c, tenant, policy, req, res, idemKey, hash)
		if err != nil {
			return nil, none, err
		}
		if ok {
			if label, ok := outcomeLabel[res.Outcome]; ok {
				s.d.Metrics.Admission(group, label) // the refusal in the request's own group
			}
			job, res, group = fjob, fres, fjob.Group
		}
	}
	log := s.log.With("tenant", tenant.Name, "user_id", req.UserID)
	s.counted(ctx, tenant.Name, group, res.Outcome)
	switch res.Outcome {
	case scheduler.Admitted:
		if policy.RequestsPerHour > 0 {
			setRateLimitHeaders(c, policy.RequestsPerHour, res.QuotaRemaining, res.QuotaReset)
		}
		if job.RequestedModel != "" {
			log = log.With("requested_model", job.RequestedModel, "fallback_from", job.FallbackFrom, "fallback_reason", job.FallbackReason)
		}
		log.Info("job queued", "job_id", job.ID, "model", job.Model, "position", res.Position, "eta_seconds", res.ETA, "input_estimate", job.CostIn)
		return job, res, nil
	case scheduler.Replay:
		prev, err := s.d.Store.Get(ctx, res.ReplayOf)
		if err != nil {
			return nil, none, err
		}
		s.quotaHeaders(c, tenant.Name, req.UserID, policy)
		return prev, res, nil
	case scheduler.Conflict:
		return nil, res, &Error{Status: http.StatusConflict, Type: "conflict",
			Message: "This Idempotency-Key was already used with a different request body. Use a new key for a new request."}
	case scheduler.OverQuota:
		log.Info("job refused: user quota", "quota", res.QuotaWhich)
		return nil, res, s.quotaRefusal(c, tenant.Name, req.UserID, policy, res, a.InputEstimate+req.MaxTokens)
	case scheduler.OverBudget:
		log.Info("job refused: dollar budget", "scope", res.Budget.Scope, "period", res.Budget.Period)
		s.quotaHeaders(c, tenant.Name, req.UserID, policy)
		return nil, res, budgetRefusal(res)
	case scheduler.QueueLimit:
		log.Info("job refused: queue limit", "queued", res.Remaining)
		s.quotaHeaders(c, tenant.Name, req.UserID, policy)
		retry := max(1, int(math.Ceil(60/float64(req.Group.RPM))))
		return nil, res, &Error{Status: http.StatusTooManyRequests, Type: "queue_limit", RetryAfter: retry,
			Message: fmt.Sprintf("You already have %d requests waiting, the most allowed at once. Wait for one of them to start, then send this again.", res.Remaining),
			Extra:   map[string]any{"queued": res.Remaining, "limit": res.Limit, "retry_after_seconds": retry}}
	case scheduler.Overloaded:
		log.Info("job refused: overloaded", "eta_seconds", res.ETA)
		s.quotaHeaders(c, tenant.Name, req.UserID, policy)
		retry := max(1, res.ETA-res.MaxWait)
		return nil, res, &Error{Status: http.StatusServiceUnavailable, Type: "overloaded", RetryAfter: retry,
			Message: fmt.Sprintf("The service is very busy: a new request would wait about %s, longer than the %s allowed. Please try again in about %s.",
				humanSeconds(res.ETA), humanSeconds(res.MaxWait), humanSeconds(retry)),
			Extra: map[string]any{"retry_after_seconds": retry, "eta_seconds": res.ETA}}
	case scheduler.Unavailable:
		retry := max(1, int(math.Ceil(res.RetryAfter.Seconds())))
		log.Warn("job refused: the model group's outage outlasted upstream.max_outage", "down_seconds", int(res.Down.Seconds()))
		s.quotaHeaders(c, tenant.Name, req.UserID, policy)
		return nil, res, &Error{Status: http.StatusServiceUnavailable, Type: "upstream_unavailable", RetryAfter: retry,
			Message: fmt.Sprintf("The Anthropic API has been unreachable for %s, so this service is not taking new requests for %s; it checks again in %s. Please try again later.",
				humanSeconds(int(res.Down.Seconds())), req.Model, humanSeconds(retry)),
			Extra: map[string]any{"retry_after_seconds": retry}}
	}
	return nil, res, fmt.Errorf("admission: unknown outcome %q", res.Outcome)
}

// admission builds the admission of a validated request in its group:
// the job (a new id in the group), its input reservation (input, or the
// local estimate when 0), cache prefixes and budgets. A request that
// could never run there, or that a dollar budget cannot price, is refused.
func (s *Server) admission(ctx context.Context, tenant *config.Tenant, policy config.UserPolicy, req *createRequest, input int, idemKey, hash string) (scheduler.Admission, error) {
	var none scheduler.Admission
	if input == 0 {
		input = s.d.Estimator.Input(ctx, req.Model, req.RawInput)
	}
	if err := fitsLimits(req, input, tenant, policy); err != nil {
		return none, err
	}
	prefixes, err := s.cachePrefixes(ctx, req, input)
	if err != nil {
		return none, err
	}
	budget, err := s.budget(tenant, policy, req.Model)
	if err != nil {
		return none, err
	}
	now := s.now().UTC().Truncate(time.Millisecond) // as the store keeps it
	job := &jobs.Job{
		ID: jobs.NewID(req.Group.Name), Tenant: tenant.Name, UserID: req.UserID, Model: req.Model,
		Group: req.Group.Name, MaxTokens: req.MaxTokens, Request: req.Request,
		Metadata: req.Metadata, CreatedAt: now, Class: req.Class,
	}
	job.TokenHash = jobs.HashToken(jobs.Token(s.d.TokenSecret, job.ID))
	if req.DeadlineSeconds > 0 {
		job.DeadlineAt = now.Add(time.Duration(req.DeadlineSeconds * float64(time.Second)))
	}
	a := scheduler.Admission{
		Job: job, Group: req.Group, InputEstimate: input, CachePrefixes: prefixes, Policy: policy, MaxWait: tenant.MaxWait,
		IdempotencyKey: idemKey, BodyHash: hash, Budget: budget,
	}
	// A background job that can wait goes by the Message Batches API when
	// its group sends batches. (POST /v1/messages has no deadline: its
	// client waits on the connection, so it never goes by batch.)
	if slack, _, _, after, _ := req.Group.BatchSettings(); req.Group.Batch && req.Class == config.ClassBackground &&
		req.DeadlineSeconds >= slack.Seconds() {
		a.BatchFallback = after
	}
	return a, nil
}

// budget is the dollar budgets a job of model answers to, with the
// model's price; a model with no price cannot be charged against a
// budget, and is refused with the fix.
func (s *Server) budget(tenant *config.Tenant, p config.UserPolicy, model string) (scheduler.Budget, error) {
	micro := func(usd float64) int64 { return int64(math.Round(usd * 1e6)) }
	b := scheduler.Budget{UserDay: micro(p.BudgetUSDPerDay), UserMonth: micro(p.BudgetUSDPerMonth),
		TenantDay: micro(tenant.TenantBudgetUSDPerDay), TenantMonth: micro(tenant.TenantBudgetUSDPerMonth)}
	if b == (scheduler.Budget{}) {
		return b, nil // no budget applies
	}
	ok := false
	if s.d.Usage != nil {
		b.Price, ok = s.d.Usage.Price(model)
	}
	if !ok {
		return b, invalid("model", "The model %s has no price in this service's price list, and your spending is capped in dollars, so it cannot be used. Ask the operator to add it to usage.prices.", model)
	}
	return b, nil
}

// budgetRefusal is the 429 budget of a spent dollar budget: which one,
// what was used, and when it renews.
func budgetRefusal(res scheduler.AdmitResult) error {
	b := res.Budget
	retry := max(1, int(math.Ceil(res.RetryAfter.Seconds())))
	whose := "Your"
	if b.Scope == "tenant" {
		whose = "This app's"
	}
	period := "daily"
	if b.Period == "month" {
		period = "monthly"
	}
	usd := func(micro int64) string { return fmt.Sprintf("$%.2f", float64(micro)/1e6) }
	msg := fmt.Sprintf("%s %s budget of %s is spent (%s used or held by requests in flight; this request may cost up to %s). It renews at %s.",
		whose, period, usd(b.Limit), usd(b.Used), usd(b.Ask), b.Renews.UTC().Format("2006-01-02 15:04 UTC"))
	return &Error{Status: http.StatusTooManyRequests, Type: "budget", RetryAfter: retry, Message: msg,
		Extra: map[string]any{"budget": b.Scope + "_" + b.Period, "limit_usd": float64(b.Limit) / 1e6, "used_usd": float64(b.Used) / 1e6,
			"request_max_usd": float64(b.Ask) / 1e6, "renews_at": b.Renews.UTC().Format(time.RFC3339), "retry_after_seconds": retry}}
}

// quotaRefusal is the 429 rate_limit of an exhausted user quota, with the
// exact time the request would fit.
func (s *Server) quotaRefusal(c *echo.Context, tenant, user string, p config.UserPolicy, res scheduler.AdmitResult, cost int) error {
	retry := int(math.Ceil(res.RetryAfter.Seconds()))
	at := s.now().Add(time.Duration(retry) * time.Second).UTC()
	when := at.Format("15:04") + " UTC"
	if at.Sub(s.now()) > 20*time.Hour {
		when = at.Format("Jan 2 15:04") + " UTC"
	}
	var msg string
	if res.QuotaWhich == "requests" {
		noun := "requests"
		if res.Limit == 1 {
			noun = "request"
		}
		msg = fmt.Sprintf("You've used your %d %s for this hour. You can send another at %s.", res.Limit, noun, when)
	} else {
		msg = fmt.Sprintf("You've used your %s tokens for this hour (this request needs about %s). You can send it at %s.",
			thousands(res.Limit), thousands(cost), when)
	}
	s.quotaHeaders(c, tenant, user, p)
	return &Error{Status: http.StatusTooManyRequests, Type: "rate_limit", RetryAfter: retry, Message: msg,
		Extra: map[string]any{"quota": res.QuotaWhich, "limit": res.Limit, "remaining": res.Remaining,
			"reset_at": at.Format(time.RFC3339), "retry_after_seconds": retry}}
}

// quotaHeaders sets the RateLimit-* headers of the user's request quota
// (none when the quota is unlimited).
func (s *Server) quotaHeaders(c *echo.Context, tenant, user string, p config.UserPolicy) {
	if p.RequestsPerHour <= 0 {
		return
	}
	req, _, err := s.d.Scheduler.Quotas(c.Request().Context(), tenant, user, p)
	if err != nil {
		return
	}
	setRateLimitHeaders(c, req.Limit, req.Remaining, int(math.Ceil(time.Until(req.ResetAt).Seconds())))
}

func setRateLimitHeaders(c *echo.Context, limit, remaining, reset int) {
	h := c.Response().Header()
	h.Set("RateLimit-Limit", strconv.Itoa(limit))
	h.Set("RateLimit-Remaining", strconv.Itoa(max(0, remaining)))
	h.Set("RateLimit-Reset", strconv.Itoa(max(0, reset)))
}

func bodyHash(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

// humanSeconds says a duration the way a person would.
func humanSeconds(s int) string {
	switch {
	case s < 90:
		return fmt.Sprintf("%d seconds", s)
	case s < 90*60:
		return fmt.Sprintf("%d minutes", (s+30)/60)
	}
	return fmt.Sprintf("%.1f hours", float64(s)/3600)
}

// thousands writes 50000 as 50,000.
func thousands(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// exactInput is the job's input reservation for groups that ask the
// upstream for its exact count; 0: use the calibrated local estimate.
func (s *Server) exactInput(ctx context.Context, req *createRequest) int {
	if req.Group.CountTokens && s.d.Upstream != nil {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		n, err := s.d.Upstream.CountTokens(cctx, req.Request)
		cancel()
		if err == nil && n > 0 {
			return n
		}
		s.log.Warn("count_tokens failed; using the local estimate", "group", req.Group.Name, "err", err)
	}
	return 0
}

// fitsLimits refuses a request that could never run: above the tenant's
// per-request input limit, the user's hourly token quota, or what the
// group's limits can carry (the upstream itself would answer 429 forever):
// its input limit, and its output limit for a group whose upstream reserves
// max_tokens.
func fitsLimits(req *createRequest, input int, t *config.Tenant, p config.UserPolicy) error {
	g := req.Group
	// Output counted as it is produced: max_tokens is bounded by the model
	// (request validation), not by the output limit per minute.
	if !g.Produced() && req.MaxTokens > g.OutputTPM {
		return invalid("request.max_tokens", "request.max_tokens is %d, but this model's output limit is %d tokens per minute, so the request could never run. Ask for at most %d.", req.MaxTokens, g.OutputTPM, g.OutputTPM)
	}
	if t != nil && t.MaxInputTokens > 0 && input > t.MaxInputTokens {
		return invalid("request.messages", "This request is about %s input tokens; the limit for one request is %s. Shorten the conversation.", thousands(input), thousands(t.MaxInputTokens))
	}
	if input > g.InputTPM {
		return invalid("request.messages", "This request is about %s input tokens, but this model's input limit is %s tokens per minute, so it could never run. Shorten the conversation.", thousands(input), thousands(g.InputTPM))
	}
	if p.TokensPerHour > 0 && input+req.MaxTokens > p.TokensPerHour {
		return invalid("request.max_tokens", "This request needs about %s tokens (%s input + max_tokens %s), more than your whole hourly quota of %s. Lower max_tokens or shorten the conversation.",
			thousands(input+req.MaxTokens), thousands(input), thousands(req.MaxTokens), thousands(p.TokensPerHour))
	}
	return nil
}

// getJob is GET /v1/jobs/{id}.
func (s *Server) getJob(c *echo.Context) error {
	job, err := s.authorizedJob(c)
	if err != nil {
		return err
	}
	v, err := s.view(c.Request().Context(), job)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, v)
}

// view renders a job, with its position and eta while it is queued.
func (s *Server) view(ctx context.Context, job *jobs.Job) (jobs.View, error) {
	v := job.View()
	if job.Status == jobs.Queued {
		if g, ok := s.group(job.Group); ok {
			pos, eta, queued, err := s.d.Scheduler.Position(ctx, job, g)
			if err != nil {
				return v, err
			}
			switch {
			case !queued && !job.BatchDue.IsZero():
				// Waiting for a batch: no place in the Messages line, and
				// a batch takes up to 24 hours.
				v.WaitReason = waitBatch
				return v, nil
			case !queued: // dispatched, about to start
				pos, eta = 1, 0
			}
			v.Position = &pos
			setETA(&v, eta)
		}
	}
	return v, nil
}

// setETA sets a queued job's eta_seconds, or, when the eta is unknown
// because its model group is in outage (-1), leaves it null and says why.
func setETA(v *jobs.View, eta int) {
	if eta < 0 {
		v.ETASeconds, v.WaitReason = nil, waitUpstream
		return
	}
	v.ETASeconds = &eta
}

// Why a job's eta is unknown: its model group is in outage, or it waits
// to go by the Message Batches API.
const (
	waitUpstream = "upstream_unavailable"
	waitBatch    = "batch"
)

// authorizedJob loads the job named in the path if the caller may see it:
// the tenant that owns it (and, when ?user_id= is given, only that user's),
// or the holder of the job's token. Anything else is a 404, so no one learns
// that someone else's job exists.
func (s *Server) authorizedJob(c *echo.Context) (*jobs.Job, error) {
	id, err := pathParam(c, "id")
	if err != nil || !jobs.ValidID(id) {
		return nil, errJobNotFound
	}
	job, err := s.d.Store.Get(c.Request().Context(), id)
	if err != nil {
		return nil, err
	}
	if t := tenantOf(c); t != nil {
		if job.Tenant != t.Name {
			return nil, errJobNotFound
		}
		if u := c.QueryParam("user_id"); u != "" {
			if u, err = userID("user_id", u); err != nil || !sameString(u, job.UserID) {
				return nil, errJobNotFound
			}
		}
		return job, nil
	}
	if !job.TokenMatches(c.QueryParam("token")) {
		return nil, errJobNotFound
	}
	return job, nil
}

func (s *Server) group(name string) (*config.ModelGroup, bool) {
	for i := range s.cfg.ModelGroups {
		if s.cfg.ModelGroups[i].Name == name {
			return &s.cfg.ModelGroups[i], true
		}
	}
	return nil, false
}
