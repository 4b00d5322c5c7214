package api

import (
	"context"
	"math"
	"net/http"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/tasks"
)

// createJob is POST /v1/jobs: validate, store the job, queue it.
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
	ctx := c.Request().Context()
	position, err := s.d.Store.Create(ctx, job, secondsPerRequest(req.Group))
	if err != nil {
		return err
	}
	if err := s.enqueue(ctx, job); err != nil {
		return err
	}
	v := job.View()
	v.Token = token
	s.fillPosition(&v, req.Group, position)
	s.log.Info("job accepted", "job_id", job.ID, "tenant", tenant.Name, "user_id", job.UserID, "model", job.Model, "position", position)
	c.Response().Header().Set("Location", "/v1/jobs/"+job.ID)
	return c.JSON(http.StatusAccepted, v)
}

// enqueue hands the job to its group's asynq queue. If that fails the job is
// marked failed (nothing was sent upstream) and the client told to retry.
func (s *Server) enqueue(ctx context.Context, job *jobs.Job) error {
	t, err := tasks.NewRunJob(tasks.RunJob{JobID: job.ID, Group: job.Group}, tasks.RunJobOptions{
		MaxRetry:  s.cfg.Upstream.MaxAttempts,
		Timeout:   s.cfg.Upstream.AttemptTimeout + time.Minute, // the worker's own attempt timeout fires first
		Retention: time.Hour,
	})
	if err == nil {
		_, err = s.d.Enqueuer.EnqueueContext(ctx, t)
	}
	if err == nil {
		return nil
	}
	s.log.Error("could not queue job", "job_id", job.ID, "err", err)
	_, ferr := s.d.Store.Apply(context.WithoutCancel(ctx), job.ID, job.Group, jobs.Transition{
		From: []jobs.Status{jobs.Queued}, To: jobs.Failed,
		Set:   map[string]string{"error": `{"type":"internal_error","message":"sluice could not queue this job."}`, "finished_at": jobs.MillisString(s.now())},
		Event: "failed", EventData: map[string]any{"error": map[string]string{"type": "internal_error", "message": "sluice could not queue this job."}},
	})
	if ferr != nil {
		s.log.Error("could not mark unqueued job failed", "job_id", job.ID, "err", ferr)
	}
	return &Error{Status: http.StatusServiceUnavailable, Type: "overloaded", RetryAfter: 1,
		Message: "sluice could not queue this job just now; nothing was charged. Please try again in a moment.",
		Extra:   map[string]any{"retry_after_seconds": 1}}
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
			pos, queued, err := s.d.Store.Position(c.Request().Context(), job)
			if err != nil {
				return err
			}
			if queued {
				s.fillPosition(&v, g, pos)
			}
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

// secondsPerRequest is the group's request pacing: 60 / rpm.
func secondsPerRequest(g *config.ModelGroup) float64 { return 60 / float64(g.RPM) }

// fillPosition sets position and a first eta: the jobs ahead, paced at the
// group's request rate. (The engine refines the eta with tokens ahead.)
func (s *Server) fillPosition(v *jobs.View, g *config.ModelGroup, position int) {
	p := position
	eta := int(math.Round(float64(position-1) * secondsPerRequest(g)))
	v.Position, v.ETASeconds = &p, &eta
}
