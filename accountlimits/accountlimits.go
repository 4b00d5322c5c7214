// Package accountlimits keeps each model group's limits in step with the
// account's: with an Admin API key, it reads the organization's rate
// limits (GET /v1/organizations/rate_limits, through the official SDK) at
// start and every Interval, maps each entry onto the configured model
// groups by their models, and hands the scheduler the account's requests,
// input and output tokens per minute. The limiter then uses the lowest of
// the configuration, the account and the limits the response headers
// announce. Without an admin key nothing is read and nothing changes.
package accountlimits

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"time"

	"github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/option"

	"github.com/sluice-dev/sluice/config"
)

// DefaultInterval is how often the account's limits are read again.
const DefaultInterval = 10 * time.Minute

// Limits are one model group's per-minute limits as the account states
// them; 0 where it states none.
type Limits struct {
	RPM, InputTPM, OutputTPM int
}

// Setter receives each group's account limits (scheduler.Scheduler).
type Setter interface {
	SetAccountLimits(ctx context.Context, g *config.ModelGroup, rpm, inputTPM, outputTPM int) error
}

// Options configure a Sync.
type Options struct {
	BaseURL  string // the upstream's base URL
	AdminKey string // the Admin API key; "" = no sync
	Groups   []config.ModelGroup
	Setter   Setter
	Interval time.Duration // default DefaultInterval
	Logger   *slog.Logger
	// HTTPClient is used for the calls (nil = the SDK's default).
	HTTPClient *http.Client
}

// Sync reads the account's limits and hands them on.
type Sync struct {
	o      Options
	client anthropic.Client
}

// New returns a Sync, or nil when there is no admin key.
func New(o Options) *Sync {
	if o.AdminKey == "" {
		return nil
	}
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	opts := []option.RequestOption{option.WithAPIKey(o.AdminKey), option.WithMaxRetries(1)}
	if o.BaseURL != "" {
		opts = append(opts, option.WithBaseURL(o.BaseURL))
	}
	if o.HTTPClient != nil {
		opts = append(opts, option.WithHTTPClient(o.HTTPClient))
	}
	return &Sync{o: o, client: anthropic.NewClient(opts...)}
}

// Run syncs now and then every Interval until ctx ends. A failed read is
// logged and the limits in force are kept.
func (s *Sync) Run(ctx context.Context) {
	t := time.NewTicker(s.o.Interval)
	defer t.Stop()
	for {
		if err := s.Once(ctx); err != nil && ctx.Err() == nil {
			s.o.Logger.Warn("could not read the account's rate limits; keeping the limits in force", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Once reads the account's limits and hands each configured group its own.
func (s *Sync) Once(ctx context.Context) error {
	got, err := s.Fetch(ctx)
	if err != nil {
		return err
	}
	for i := range s.o.Groups {
		g := &s.o.Groups[i]
		l, ok := got[g.Name]
		if !ok {
			continue
		}
		if err := s.o.Setter.SetAccountLimits(ctx, g, l.RPM, l.InputTPM, l.OutputTPM); err != nil {
			return err
		}
		s.o.Logger.Debug("account limits", "group", g.Name, "rpm", l.RPM, "input_tpm", l.InputTPM, "output_tpm", l.OutputTPM)
	}
	return nil
}

// Fetch reads the account's model-group limits and maps them onto the
// configured groups (by name).
func (s *Sync) Fetch(ctx context.Context) (map[string]Limits, error) {
	pager := s.client.Organization.RateLimits.ListAutoPaging(ctx, anthropic.OrganizationRateLimitListParams{
		GroupType: anthropic.OrganizationRateLimitListParamsGroupTypeModelGroup,
	})
	out := map[string]Limits{}
	for pager.Next() {
		e := pager.Current()
		var l Limits
		for _, v := range e.Limits {
			switch v.Type {
			case "requests_per_minute":
				l.RPM = int(v.Value)
			case "input_tokens_per_minute", "input_tokens_per_minute_cache_aware":
				l.InputTPM = int(v.Value)
			case "output_tokens_per_minute":
				l.OutputTPM = int(v.Value)
			}
		}
		for i := range s.o.Groups {
			g := &s.o.Groups[i]
			if covers(e.Models, g.Models) {
				out[g.Name] = lower(out[g.Name], l)
			}
		}
	}
	if err := pager.Err(); err != nil {
		var apiErr *anthropic.Error
		if errors.As(err, &apiErr) {
			switch apiErr.StatusCode {
			case http.StatusUnauthorized:
				return nil, fmt.Errorf("the Admin API refused ANTHROPIC_ADMIN_KEY (401): check that it is a current admin key (sk-ant-admin…)")
			case http.StatusForbidden:
				return nil, fmt.Errorf("ANTHROPIC_ADMIN_KEY is not an Admin API key (403): create one in the console's admin keys, not an API key")
			}
		}
		return nil, err
	}
	return out, nil
}

// covers reports whether an entry's models (names or patterns) cover any
// of a group's models (names or patterns).
func covers(entry, group []string) bool {
	for _, e := range entry {
		for _, g := range group {
			if e == g {
				return true
			}
			if ok, _ := path.Match(e, g); ok {
				return true
			}
			if ok, _ := path.Match(g, e); ok {
				return true
			}
		}
	}
	return false
}

// lower is the lower of two limits, dimension by dimension (0 = none).
func lower(a, b Limits) Limits {
	m := func(x, y int) int {
		switch {
		case x == 0:
			return y
		case y == 0:
			return x
		}
		return min(x, y)
	}
	return Limits{m(a.RPM, b.RPM), m(a.InputTPM, b.InputTPM), m(a.OutputTPM, b.OutputTPM)}
}
