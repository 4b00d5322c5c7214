package api

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// cancelJob is DELETE /v1/jobs/{id}. A queued job leaves its lane and its
// reservations are refunded; a running job's upstream call is stopped and
// charged what it used (by the worker running it). A finished job is a 409
// and nothing changes.
func (s *Server) cancelJob(c *echo.Context) error {
	job, err := s.authorizedJob(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	g, ok := s.group(job.Group)
	if !ok {
		return fmt.Errorf("job %s: unknown group %q", job.ID, job.Group)
	}
	from, err := s.cancel(ctx, job, g)
	var se *jobs.StateError
	if errors.As(err, &se) {
		if se.Current.Terminal() {
			return &Error{Status: http.StatusConflict, Type: "conflict",
				Message: fmt.Sprintf("This job has already finished (%s), so there is nothing to cancel; nothing was changed.", se.Current),
				Extra:   map[string]any{"status": se.Current}}
		}
		return &Error{Status: http.StatusConflict, Type: "conflict", Message: "This job changed state while it was being canceled; look at it again."}
	}
	if err != nil {
		return err
	}
	s.log.Info("job canceled", "job_id", job.ID, "tenant", job.Tenant, "user_id", job.UserID, "was", from)
	job, err = s.d.Store.Get(ctx, job.ID)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, job.View())
}

// cancel ends a job in one of the statuses from (queued or running when
// none is given) as canceled and returns the status it had: one atomic step
// (scheduler.Cancel). A job with no call running
// leaves its lane and gets every reservation back; a running call is told
// to stop, and its worker charges what it used. It fails with
// *jobs.StateError when the job has already ended.
func (s *Server) cancel(ctx context.Context, job *jobs.Job, g *config.ModelGroup, from ...jobs.Status) (jobs.Status, error) {
	from0, err := s.d.Scheduler.Cancel(ctx, g, job, s.now().UTC(), s.policy(job), from...)
	if err != nil {
		return "", err
	}
	s.d.Metrics.Finished(g.Name, string(jobs.Canceled))
	return from0, nil
}

func (s *Server) policy(j *jobs.Job) config.UserPolicy {
	if t, ok := s.cfg.Tenant(j.Tenant); ok {
		return t.Policy(j.UserID)
	}
	return config.UserPolicy{}
}

const (
	defaultListLimit = 20
	maxListLimit     = 100
)

// listJobs is GET /v1/jobs?user_id=&status=&limit=&cursor=: the tenant's
// (or one user's) jobs, newest first.
func (s *Server) listJobs(c *echo.Context) error {
	tenant := tenantOf(c)
	user := c.QueryParam("user_id")
	if user != "" {
		var err error
		if user, err = userID("user_id", user); err != nil {
			return err
		}
	}
	var status jobs.Status
	if v := c.QueryParam("status"); v != "" {
		status = jobs.Status(v)
		switch status {
		case jobs.Queued, jobs.Running, jobs.Succeeded, jobs.Failed, jobs.Canceled, jobs.Expired:
		default:
			return invalid("status", "status %q is not a job status; use queued, running, succeeded, failed, canceled or expired.", truncate(v, 32))
		}
	}
	limit := defaultListLimit
	if v := c.QueryParam("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxListLimit {
			return invalid("limit", "limit must be a whole number from 1 to %d.", maxListLimit)
		}
		limit = n
	}
	var cur *jobs.Cursor
	if v := c.QueryParam("cursor"); v != "" {
		cc, err := decodeCursor(v)
		if err != nil {
			return invalid("cursor", "This cursor is not one sluice gave out; start again without it.")
		}
		cur = &cc
	}
	list, next, err := s.d.Store.List(c.Request().Context(), jobs.ListQuery{
		Groups: s.cfg.GroupNames(), Tenant: tenant.Name, User: user, Status: status, Limit: limit, After: cur,
	})
	if err != nil {
		return err
	}
	out := struct {
		Jobs       []jobs.View `json:"jobs"`
		NextCursor string      `json:"next_cursor,omitempty"`
	}{Jobs: make([]jobs.View, 0, len(list))}
	for _, j := range list {
		out.Jobs = append(out.Jobs, j.View())
	}
	if next != nil {
		out.NextCursor = encodeCursor(*next)
	}
	return c.JSON(http.StatusOK, out)
}

func encodeCursor(c jobs.Cursor) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(c.Score, 10) + ":" + c.ID))
}

func decodeCursor(s string) (jobs.Cursor, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return jobs.Cursor{}, err
	}
	ms, id, ok := strings.Cut(string(b), ":")
	n, err := strconv.ParseInt(ms, 10, 64)
	if !ok || err != nil || !jobs.ValidID(id) {
		return jobs.Cursor{}, errors.New("bad cursor")
	}
	return jobs.Cursor{Score: n, ID: id}, nil
}

// userUsage is GET /v1/users/{user_id}/usage: the user's quotas, and how
// many of their jobs wait and run.
func (s *Server) userUsage(c *echo.Context) error {
	tenant := tenantOf(c)
	user, err := pathUserID(c)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	p := tenant.Policy(user)
	req, tok, err := s.d.Scheduler.Quotas(ctx, tenant.Name, user, p)
	if err != nil {
		return err
	}
	queued, running, err := s.d.Store.Counts(ctx, s.cfg.GroupNames(), tenant.Name, user)
	if err != nil {
		return err
	}
	if p.RequestsPerHour > 0 {
		setRateLimitHeaders(c, req.Limit, req.Remaining, int(time.Until(req.ResetAt).Seconds()+0.999))
	}
	q := func(x scheduler.Quota) map[string]any {
		if x.Limit == 0 {
			return map[string]any{"limit": nil, "remaining": nil, "reset_at": nil, "unlimited": true}
		}
		return map[string]any{"limit": x.Limit, "remaining": x.Remaining, "reset_at": x.ResetAt.Format(time.RFC3339)}
	}
	out := map[string]any{
		"user_id": user, "requests": q(req), "tokens": q(tok), "queued": queued, "running": running,
		"max_queued": p.MaxQueued,
	}
	limits := [4]float64{p.BudgetUSDPerDay, p.BudgetUSDPerMonth, tenant.TenantBudgetUSDPerDay, tenant.TenantBudgetUSDPerMonth}
	if limits != [4]float64{} {
		use, err := s.d.Scheduler.Budgets(ctx, tenant.Name, user)
		if err != nil {
			return err
		}
		budgets := map[string]any{}
		for i, name := range []string{"user_day", "user_month", "tenant_day", "tenant_month"} {
			if limits[i] <= 0 {
				continue
			}
			used := float64(use[i].Used) / 1e6
			budgets[name] = map[string]any{"limit_usd": limits[i], "used_usd": used,
				"remaining_usd": math.Max(0, math.Round((limits[i]-used)*1e6)/1e6), "renews_at": use[i].Renews.Format(time.RFC3339)}
		}
		out["budgets"] = budgets
	}
	return c.JSON(http.StatusOK, out)
}
