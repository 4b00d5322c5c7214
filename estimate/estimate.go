// Package estimate guesses a request's input tokens before the upstream
// counts them: a conservative local count, calibrated per model by an EWMA of
// actual/estimated from every response (kept in Redis, shared by the fleet).
package estimate

import (
	"context"
	_ "embed"
	"encoding/json"
	"math"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"

	"github.com/sluice-dev/sluice/internal/rkeys"
)

// Raw is a conservative local count of a Messages request's input tokens.
// Counting bytes/4 under-counts code (+29%), JSON (+58%) and non-Latin text
// (Korean +150%), so this counts letters, digits and spaces at 3 bytes a
// token, ASCII punctuation at 0.6 of a token each (code and JSON are dense
// with it), and every non-ASCII character as 2.5 tokens; plus the framing (8)
// and 4 a message. Tools and other blocks count by their JSON.
func Raw(body []byte) int {
	var req struct {
		System   json.RawMessage   `json:"system"`
		Messages []json.RawMessage `json:"messages"`
		Tools    json.RawMessage   `json:"tools"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return textTokens(body)
	}
	contents := make([]json.RawMessage, len(req.Messages))
	for i, m := range req.Messages {
		var msg struct {
			Content json.RawMessage `json:"content"`
		}
		_ = json.Unmarshal(m, &msg)
		contents[i] = msg.Content
	}
	return RawParts(req.System, contents, req.Tools)
}

// RawParts is Raw from a request already taken apart: its system prompt,
// each message's content, and its tools.
func RawParts(system json.RawMessage, contents []json.RawMessage, tools json.RawMessage) int {
	n := 8.0
	n += content(system)
	for _, c := range contents {
		n += 4 + content(c)
	}
	if len(tools) > 0 && string(tools) != "null" {
		n += float64(textTokens(tools))
	}
	return int(math.Ceil(n))
}

// Fragment is Raw's count of one part of a request: a content block, a
// tool definition, or a string standing for a text block (its JSON
// string). Text blocks count by their text, anything else by its JSON,
// framing not included: the sum over a prompt-cache prefix's blocks is a
// little below Raw's count of the same prompt, so the cached part of a
// request is never overestimated.
func Fragment(raw json.RawMessage) int {
	if len(raw) == 0 || string(raw) == "null" {
		return 0
	}
	var s string
	if raw[0] == '"' && json.Unmarshal(raw, &s) == nil {
		return int(math.Floor(text(s)))
	}
	var b struct {
		Type string  `json:"type"`
		Text *string `json:"text"`
	}
	if raw[0] == '{' && json.Unmarshal(raw, &b) == nil && b.Type == "text" && b.Text != nil {
		return int(math.Floor(text(*b.Text)))
	}
	return int(math.Floor(text(string(raw))))
}

// content counts a string or an array of blocks (text blocks by their text,
// others by their JSON).
func content(raw json.RawMessage) float64 {
	if len(raw) == 0 || string(raw) == "null" {
		return 0
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return text(s)
	}
	var blocks []map[string]json.RawMessage
	if json.Unmarshal(raw, &blocks) != nil {
		return float64(textTokens(raw))
	}
	n := 0.0
	for _, b := range blocks {
		var typ string
		_ = json.Unmarshal(b["type"], &typ)
		if typ == "text" {
			var t string
			_ = json.Unmarshal(b["text"], &t)
			n += text(t)
			continue
		}
		bb, _ := json.Marshal(b)
		n += text(string(bb))
	}
	return n
}

func text(s string) float64 {
	var word, punct, other float64
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == ' ':
				word++
			default:
				punct++
			}
			i++
			continue
		}
		_, size := utf8.DecodeRuneInString(s[i:])
		other++
		i += size
	}
	return word/3 + punct*0.6 + other*2.5
}

func textTokens(b []byte) int { return int(math.Ceil(text(string(b)))) }

// Calibrator keeps, per model, the ratio of the upstream's count to Raw and
// applies it with a safety margin. The ratios live in Redis so that every
// process learns from every response; each process caches them briefly.
type Calibrator struct {
	rdb    redis.UniversalClient
	margin float64
	ttl    time.Duration

	mu    sync.Mutex
	cache map[string]cached
}

type cached struct {
	ratio float64
	at    time.Time
}

const (
	ratiosKey = rkeys.EstimateRatios
	// Margin is added to the calibrated estimate: under-estimating risks an
	// upstream 429, over-estimating only delays (the excess is refunded).
	Margin = 0.10
	// alpha is the EWMA weight of a new observation.
	alpha = 0.2
	// cacheTTL is how long a process reuses a ratio before re-reading it.
	cacheTTL = 5 * time.Second
)

// NewCalibrator returns a Calibrator on rdb.
func NewCalibrator(rdb redis.UniversalClient) *Calibrator {
	return &Calibrator{rdb: rdb, margin: Margin, ttl: cacheTTL, cache: map[string]cached{}}
}

// Ratio is the model's current actual/raw ratio (1 until observed).
func (c *Calibrator) Ratio(ctx context.Context, model string) float64 {
	c.mu.Lock()
	e, ok := c.cache[model]
	c.mu.Unlock()
	if ok && time.Since(e.at) < c.ttl {
		return e.ratio
	}
	r := 1.0
	if v, err := c.rdb.HGet(ctx, ratiosKey, model).Result(); err == nil {
		if f, err := strconv.ParseFloat(v, 64); err == nil && f > 0 {
			r = f
		}
	} else if err != redis.Nil {
		// Redis hiccup: the last known ratio, not remembered as new.
		if ok {
			return e.ratio
		}
		return r
	}
	c.mu.Lock()
	c.cache[model] = cached{ratio: r, at: time.Now()}
	c.mu.Unlock()
	return r
}

// Input is the calibrated estimate of a request's input tokens, from its
// Raw count.
func (c *Calibrator) Input(ctx context.Context, model string, raw int) int {
	return Calibrated(raw, c.Ratio(ctx, model), c.margin)
}

// Calibrated applies a ratio and a margin to a raw count.
func Calibrated(raw int, ratio, margin float64) int {
	return max(1, int(math.Ceil(float64(raw)*ratio*(1+margin))))
}

var (
	//go:embed lua/observe.lua
	observeSrc    string
	observeScript = redis.NewScript(observeSrc)
)

// Observe feeds one response: the upstream counted actual input tokens for
// a request whose Raw count was raw.
func (c *Calibrator) Observe(ctx context.Context, model string, raw, actual int) error {
	if raw <= 0 || actual <= 0 {
		return nil
	}
	obs := math.Min(10, math.Max(0.1, float64(actual)/float64(raw)))
	v, err := observeScript.Run(ctx, c.rdb, []string{ratiosKey}, model, obs, alpha).Text()
	if err != nil {
		return err
	}
	if f, err := strconv.ParseFloat(v, 64); err == nil {
		c.mu.Lock()
		c.cache[model] = cached{ratio: f, at: time.Now()}
		c.mu.Unlock()
	}
	return nil
}
