package fakeanthropic

import (
	"errors"
	"fmt"
	"log/slog"
	"path"
	"time"
)

// OTPM accounting modes for Config.OTPMMode, the Anthropic API's two: the
// older rule reserves max_tokens at request start, the current one counts
// output as it is produced. OTPMRealtime, the current rule, is the default.
const (
	// OTPMReserve takes max_tokens from the output bucket when a request is
	// admitted and gives back max_tokens minus the actual output at its end.
	// A request is refused while the output bucket holds less than max_tokens.
	OTPMReserve = "reserve"
	// OTPMRealtime takes each output token from the output bucket as it is
	// produced (the bucket may go negative); max_tokens does not count. A
	// request is refused while the output bucket is empty or negative. This
	// is the API's current rule and the default.
	OTPMRealtime = "realtime"
)

// Defaults filled in by New.
const (
	// DefaultReplyTokens is the reply length, in output tokens, when neither
	// Config.ReplyTokens nor a [[reply_tokens=N]] directive says otherwise.
	DefaultReplyTokens = 20
	// DefaultRetryAfter is the retry-after of injected rate_limit, ramp_limit
	// and unavailable faults whose FaultRule.RetryAfter is zero.
	DefaultRetryAfter = time.Second
)

// Config configures a Server. The zero value is usable: one tier-1 group for
// claude-* models, realtime OTPM (the API's current rule), no pacing, any
// API key accepted, any sk-ant-admin… key accepted as an Admin API key, no
// faults.
type Config struct {
	// Groups are the model groups, each with its own buckets (a "model
	// class" upstream). A request's model picks the first group with a
	// matching pattern; a model no group matches gets 404 not_found_error.
	// Default: TierOne().
	Groups []Group
	// OTPMMode is OTPMRealtime or OTPMReserve. Default: OTPMRealtime, the
	// API's current rule (output counted as produced, max_tokens ignored).
	OTPMMode string
	// TokensPerSecond paces output, streaming or not, in output tokens per
	// second of wall-clock time. Default 0: as fast as possible.
	TokensPerSecond float64
	// Latency is the wall-clock wait between admitting a request and the
	// first byte of its answer. Errors and 429s are answered at once.
	// Default 0.
	Latency time.Duration
	// ReplyTokens is the reply length in output tokens when the prompt has
	// no [[reply_tokens=N]] directive; replies are always capped by
	// max_tokens. Default DefaultReplyTokens (20).
	ReplyTokens int
	// APIKeys are the accepted API keys. Default empty: any non-empty key
	// is accepted.
	APIKeys []string
	// AdminKeys are the Admin API keys that GET /v1/organizations/rate_limits
	// accepts. Default empty: any key that starts with "sk-ant-admin" (the
	// prefix of real Admin API keys) is accepted there. Admin keys are only
	// for the Admin API route; APIKeys govern /v1/messages as before.
	AdminKeys []string
	// Faults are the random fault rules applied to every /v1/messages
	// request after the queued faults (see Server.QueueFaults) run out.
	// Their rates add up to at most 1. Default none.
	Faults []FaultRule
	// Clock tells the time for rate-limit accounting, headers and the
	// request log. Pacing and Latency always use wall-clock timers.
	// Default time.Now.
	Clock func() time.Time
	// Seed seeds the random fault draws; the same seed and the same arrival
	// order give the same faults. Default 0: a random seed.
	Seed int64
	// Logger receives a debug line per /v1/messages request. Default: discard.
	Logger *slog.Logger
	// BatchDelay is how long a Message Batch processes before it ends
	// (its results are then readable). Default 0: at once.
	BatchDelay time.Duration
	// BatchQueueLimit caps the requests waiting in batches not ended, as
	// the API's processing-queue limit does: a batch that would pass it is
	// refused with 429. Default 0: no cap.
	BatchQueueLimit int
}

// Group is a set of models that share one set of rate-limit buckets.
type Group struct {
	// Name names the group in Stats and logs; unique within a Config.
	Name string
	// Models are exact model names or path.Match globs such as
	// "claude-sonnet-*".
	Models []string
	// RPM is the requests-per-minute limit (and the capacity of the
	// requests bucket). count_tokens has a separate bucket of the same size.
	RPM int
	// InputTPM is the input-tokens-per-minute limit: input_tokens plus
	// cache_creation_input_tokens; cache reads are free unless
	// CountCacheReads.
	InputTPM int
	// OutputTPM is the output-tokens-per-minute limit.
	OutputTPM int
	// CountCacheReads makes cache reads count toward InputTPM too, as they
	// do on legacy models (the Rate Limits API then reports the input limit
	// as input_tokens_per_minute rather than
	// input_tokens_per_minute_cache_aware). Default false: the current rule,
	// where ITPM counts input_tokens + cache_creation_input_tokens only.
	CountCacheReads bool
	// CacheMinTokens is the shortest prefix, in input tokens, that a
	// cache_control breakpoint caches. Default 0: by model, 2,048 for a
	// model whose name contains "haiku" and 1,024 for every other (the
	// Sonnet/Opus minimum).
	CacheMinTokens int
	// ReportedModels are the model names that GET
	// /v1/organizations/rate_limits lists for this group. Default: Models,
	// as written (globs included).
	ReportedModels []string
}

// TierOne returns the 2025 Tier 1 limits for Sonnet/Opus 4.x as one group,
// "claude", for every claude-* model: 50 RPM, 30,000 ITPM, 8,000 OTPM. They
// make queues form quickly, which is what a rehearsal needs.
func TierOne() []Group {
	return []Group{{
		Name:      "claude",
		Models:    []string{"claude-*"},
		RPM:       50,
		InputTPM:  30_000,
		OutputTPM: 8_000,
	}}
}

// FaultKind names an injected failure.
type FaultKind string

// The fault kinds. Each mimics what the real API or the network in front of
// it does; see FaultRule.
const (
	// FaultOverloaded answers 529 overloaded_error "Overloaded".
	FaultOverloaded FaultKind = "overloaded"
	// FaultAPIError answers 500 api_error.
	FaultAPIError FaultKind = "api_error"
	// FaultUnavailable answers 503 with retry-after (RetryAfter, default 1 s).
	FaultUnavailable FaultKind = "unavailable"
	// FaultRateLimit answers 429 rate_limit_error with retry-after
	// (RetryAfter, default 1 s) and x-should-retry: true, whatever the
	// buckets hold.
	FaultRateLimit FaultKind = "rate_limit"
	// FaultSpendLimit answers 429 rate_limit_error with error_code
	// "enforced_spend_limit_reached", no retry-after and x-should-retry: false.
	FaultSpendLimit FaultKind = "spend_limit"
	// FaultRampLimit answers 429 rate_limit_error with error_code
	// "ramp_limit_exceeded" and retry-after (RetryAfter, default 1 s).
	FaultRampLimit FaultKind = "ramp_limit"
	// FaultStreamError admits the request, starts a 200 stream, sends half
	// of the output tokens' deltas and then an `event: error` carrying an
	// overloaded_error. A non-streaming request gets a plain 529 instead.
	FaultStreamError FaultKind = "stream_error"
	// FaultStreamCut admits the request, starts a 200 stream, sends half of
	// the output tokens' deltas and ends the stream cleanly without content_block_stop,
	// message_delta or message_stop, closing the connection. A non-streaming
	// request gets its headers and half of its body, then the connection is
	// closed. Either way the output produced counts as billed.
	FaultStreamCut FaultKind = "stream_cut"
	// FaultDrop closes the connection without any response.
	FaultDrop FaultKind = "drop"
	// FaultBadRequest answers 400 invalid_request_error.
	FaultBadRequest FaultKind = "bad_request"
	// FaultTimeout answers 504 timeout_error.
	FaultTimeout FaultKind = "timeout"
)

// FaultKinds lists every fault kind, in the order of the constants.
func FaultKinds() []FaultKind {
	return []FaultKind{
		FaultOverloaded, FaultAPIError, FaultUnavailable, FaultRateLimit,
		FaultSpendLimit, FaultRampLimit, FaultStreamError, FaultStreamCut,
		FaultDrop, FaultBadRequest, FaultTimeout,
	}
}

// Valid reports whether k is one of the fault kinds.
func (k FaultKind) Valid() bool {
	for _, known := range FaultKinds() {
		if k == known {
			return true
		}
	}
	return false
}

// admitted reports whether a request with this fault goes through the
// rate limiter and consumes tokens: only the stream faults do, because the
// request really ran (and a cut request may still be billed).
func (k FaultKind) admitted(stream bool) bool {
	switch k {
	case "":
		return true
	case FaultStreamCut:
		return true
	case FaultStreamError:
		return stream
	}
	return false
}

// FaultRule is one fault: queued (Server.QueueFaults) it applies once; in
// Config.Faults it applies to a random share Rate of requests.
type FaultRule struct {
	Kind FaultKind
	// Rate is the probability, 0 to 1, that a request gets this fault. Only
	// random rules (Config.Faults) use it.
	Rate float64
	// RetryAfter is the retry-after sent by rate_limit, ramp_limit and
	// unavailable faults, rounded up to whole seconds. Default
	// DefaultRetryAfter (1 s).
	RetryAfter time.Duration
}

// withDefaults returns cfg with defaults filled in and every problem found,
// joined.
func (cfg Config) withDefaults() (Config, error) {
	var errs []error
	if len(cfg.Groups) == 0 {
		cfg.Groups = TierOne()
	}
	names := make(map[string]bool)
	for i, g := range cfg.Groups {
		if g.Name == "" {
			errs = append(errs, fmt.Errorf("groups[%d]: name is empty", i))
		} else if names[g.Name] {
			errs = append(errs, fmt.Errorf("groups[%d]: name %q is used twice", i, g.Name))
		}
		names[g.Name] = true
		if len(g.Models) == 0 {
			errs = append(errs, fmt.Errorf("group %q: no model patterns", g.Name))
		}
		for _, p := range g.Models {
			if _, err := path.Match(p, ""); err != nil || p == "" {
				errs = append(errs, fmt.Errorf("group %q: bad model pattern %q", g.Name, p))
			}
		}
		if g.RPM <= 0 || g.InputTPM <= 0 || g.OutputTPM <= 0 {
			errs = append(errs, fmt.Errorf("group %q: RPM, InputTPM and OutputTPM must be positive (got %d, %d, %d)",
				g.Name, g.RPM, g.InputTPM, g.OutputTPM))
		}
		if g.CacheMinTokens < 0 {
			errs = append(errs, fmt.Errorf("group %q: cache min tokens %d: must not be negative", g.Name, g.CacheMinTokens))
		}
		for _, m := range g.ReportedModels {
			if m == "" {
				errs = append(errs, fmt.Errorf("group %q: empty reported model", g.Name))
			}
		}
	}
	switch cfg.OTPMMode {
	case "":
		cfg.OTPMMode = OTPMRealtime
	case OTPMReserve, OTPMRealtime:
	default:
		errs = append(errs, fmt.Errorf("otpm mode %q: want %q or %q", cfg.OTPMMode, OTPMReserve, OTPMRealtime))
	}
	if cfg.TokensPerSecond < 0 {
		errs = append(errs, fmt.Errorf("tokens per second %v: must not be negative", cfg.TokensPerSecond))
	}
	if cfg.BatchDelay < 0 {
		errs = append(errs, fmt.Errorf("batch delay %v: must not be negative", cfg.BatchDelay))
	}
	if cfg.BatchQueueLimit < 0 {
		errs = append(errs, fmt.Errorf("batch queue limit %d: must not be negative", cfg.BatchQueueLimit))
	}
	if cfg.Latency < 0 {
		errs = append(errs, fmt.Errorf("latency %v: must not be negative", cfg.Latency))
	}
	switch {
	case cfg.ReplyTokens == 0:
		cfg.ReplyTokens = DefaultReplyTokens
	case cfg.ReplyTokens < 0:
		errs = append(errs, fmt.Errorf("reply tokens %d: must not be negative", cfg.ReplyTokens))
	}
	for i, k := range cfg.APIKeys {
		if k == "" {
			errs = append(errs, fmt.Errorf("api keys[%d]: empty key", i))
		}
	}
	for i, k := range cfg.AdminKeys {
		if k == "" {
			errs = append(errs, fmt.Errorf("admin keys[%d]: empty key", i))
		}
	}
	total := 0.0
	for i, f := range cfg.Faults {
		if err := f.validate(); err != nil {
			errs = append(errs, fmt.Errorf("faults[%d]: %w", i, err))
		}
		if f.Rate < 0 || f.Rate > 1 {
			errs = append(errs, fmt.Errorf("faults[%d]: rate %v is not between 0 and 1", i, f.Rate))
		}
		total += f.Rate
	}
	if total > 1+1e-9 {
		errs = append(errs, fmt.Errorf("faults: rates add up to %v, more than 1", total))
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg, errors.Join(errs...)
}

func (f FaultRule) validate() error {
	if !f.Kind.Valid() {
		return fmt.Errorf("unknown fault kind %q", f.Kind)
	}
	if f.RetryAfter < 0 {
		return fmt.Errorf("fault %q: retry-after %v is negative", f.Kind, f.RetryAfter)
	}
	return nil
}
