package api

import (
	"context"
	"net/http"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
)

// createJob is POST /v1/jobs: validate, estimate, store and queue the job
// fairly (one Lua script), answer with its position.
func (s *Server) createJob(c *echo.Context) error {
	tenant := tenantOf(c)
	body, err := s.readBody(c)
	if err != nil {
		return err
	}
	req, err := parseCreate(body, s.cfg, tenant)
	if err != nil {
		return err
	}
	ctx := c.Request().Context()
	input := s.inputTokens(ctx, req)
	if err := fitsGroup(req, input); err != nil {
		return err
	}
	token, tokenHash := jobs.NewToken()
	now := s.now().UTC().Truncate(time.Millisecond) // as the store keeps it
	job := &jobs.Job{
		ID: jobs.NewID(), Tenant: tenant.Name, UserID: req.UserID, Model: req.Model,
		Group: req.Group.Name, MaxTokens: req.MaxTokens, Request: req.Request,
		Metadata: req.Metadata, CreatedAt: now, TokenHash: tokenHash,
	}
	if req.DeadlineSeconds > 0 {
		job.DeadlineAt = now.Add(time.Duration(req.DeadlineSeconds * float64(time.Second)))
	}
	position, eta, err := s.d.Scheduler.Admit(ctx, job, req.Group, input, tenant.WeightOf(req.UserID))
	if err != nil {
		return err
	}
	v := job.View()
	v.Token = token
	v.Position, v.ETASeconds = &position, &eta
	s.log.Info("job accepted", "job_id", job.ID, "tenant", tenant.Name, "user_id", job.UserID, "model", job.Model, "position", position, "input_estimate", input)
	c.Response().Header().Set("Location", "/v1/jobs/"+job.ID)
	return c.JSON(http.StatusAccepted, v)
}

// inputTokens is the job's input reservation: the upstream's exact count for
// groups that ask for it, else the calibrated local estimate.
func (s *Server) inputTokens(ctx context.Context, req *createRequest) int {
	if req.Group.CountTokens && s.d.Upstream != nil {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		n, err := s.d.Upstream.CountTokens(cctx, req.Request)
		cancel()
		if err == nil && n > 0 {
			return n
		}
		s.log.Warn("count_tokens failed; using the local estimate", "group", req.Group.Name, "err", err)
	}
	return s.d.Estimator.Input(ctx, req.Model, req.Request)
}

// fitsGroup refuses a request the group's limits could never carry: the
// upstream itself would answer 429 to it forever.
func fitsGroup(req *createRequest, input int) error {
	g := req.Group
	if req.MaxTokens > g.OutputTPM {
		return invalid("request.max_tokens", "request.max_tokens is %d, but this model's output limit is %d tokens per minute, so the request could never run. Ask for at most %d.", req.MaxTokens, g.OutputTPM, g.OutputTPM)
	}
	if input > g.InputTPM {
		return invalid("request.messages", "This request is about %d input tokens, but this model's input limit is %d tokens per minute, so it could never run. Shorten the conversation.", input, g.InputTPM)
	}
	return nil
}

// getJob is GET /v1/jobs/{id}.
func (s *Server) getJob(c *echo.Context) error {
	job, err := s.authorizedJob(c)
	if err != nil {
		return err
	}
	v := job.View()
	if job.Status == jobs.Queued {
		if g, ok := s.group(job.Group); ok {
			pos, eta, queued, err := s.d.Scheduler.Position(c.Request().Context(), job, g)
			if err != nil {
				return err
			}
			if !queued { // dispatched, about to start
				pos, eta = 1, 0
			}
			v.Position, v.ETASeconds = &pos, &eta
		}
	}
	return c.JSON(http.StatusOK, v)
}

// authorizedJob loads the job named in the path if the caller may see it:
// the tenant that owns it (and, when ?user_id= is given, only that user's),
// or the holder of the job's token. Anything else is a 404, so no one learns
// that someone else's job exists.
func (s *Server) authorizedJob(c *echo.Context) (*jobs.Job, error) {
	id := c.Param("id")
	if !jobs.ValidID(id) {
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
		if u := c.QueryParam("user_id"); u != "" && !sameString(u, job.UserID) {
			return nil, errJobNotFound
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
