package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
)

// usage is `sluice help`.
var usage = `sluice — a fair, rate-limit-aware queue in front of the Anthropic Messages API.

Usage: sluice <command> [flags]

Commands:
` + helpTable(
	[2]string{"dev", "zero-setup: api + worker + a fake upstream, on a Redis it finds or starts"},
	[2]string{"serve", "api and worker in one process"},
	[2]string{"api", "the HTTP api only (many may run against one Redis)"},
	[2]string{"worker", "a worker only: runs queued jobs against the upstream"},
	[2]string{"fake-anthropic", "a stand-in for the Anthropic API, with real limits and fault injection"},
	[2]string{"loadtest", "drive a sluice through a scenario and measure utilization and fairness"},
	[2]string{"migrate", "move an earlier release's Redis keys to this release's layout (after its queue drained)"},
	[2]string{"keygen", "print a new random key and its sha256 form for the config file"},
	[2]string{"healthcheck", "GET a URL, exit 0 on 200 (the container health check)"},
	[2]string{"help", "this text"},
) + `
Run "sluice <command> --help" for the flags and environment variables of each.
`

// run is the whole program: main only calls it. It returns when ctx ends (a
// signal) or a part fails to start.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "serve":
		return runServer(ctx, "serve", rest, getenv, stdout, stderr)
	case "api":
		return runServer(ctx, "api", rest, getenv, stdout, stderr)
	case "worker":
		return runServer(ctx, "worker", rest, getenv, stdout, stderr)
	case "dev":
		return runDev(ctx, rest, getenv, stdout, stderr)
	case "fake-anthropic":
		return runFake(ctx, rest, getenv, stdout, stderr)
	case "loadtest":
		return runLoadtest(ctx, rest, getenv, stdout, stderr)
	case "migrate":
		return runMigrate(ctx, rest, getenv, stdout, stderr)
	case "keygen":
		return runKeygen(rest, stdout, stderr)
	case "healthcheck":
		return runHealthcheck(ctx, rest, stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}

// envOr is the value of an environment variable, or def.
func envOr(getenv func(string) string, name, def string) string {
	if v := getenv(name); v != "" {
		return v
	}
	return def
}

// Help tables: two spaces, the terms in a column as wide as the widest
// (up to helpTermMax), two spaces, the descriptions wrapped to helpWidth
// with their continuation lines under their first. A term wider than
// helpTermMax has its description start on the next line, in the column.
const (
	helpWidth   = 90
	helpTermMax = 28
)

// helpTable formats rows of (term, description) as a help section. A "\n"
// in a description starts a new line there.
func helpTable(rows ...[2]string) string {
	w := 0
	for _, r := range rows {
		if n := len([]rune(r[0])); n <= helpTermMax {
			w = max(w, n)
		}
	}
	col := 2 + w + 2
	pad := strings.Repeat(" ", col)
	var b strings.Builder
	for _, r := range rows {
		term := "  " + r[0]
		lines := wrapHelp(r[1], helpWidth-col)
		if n := len([]rune(term)); n+2 > col {
			b.WriteString(term + "\n")
		} else if lines[0] != "" {
			b.WriteString(term + strings.Repeat(" ", col-n) + lines[0] + "\n")
			lines = lines[1:]
		} else {
			b.WriteString(term + "\n")
		}
		for _, l := range lines {
			b.WriteString(pad + l + "\n")
		}
	}
	return b.String()
}

// wrapHelp splits text into lines of at most width characters, at spaces
// (a longer word gets a line of its own) and at each "\n".
func wrapHelp(text string, width int) []string {
	var lines []string
	for _, para := range strings.Split(text, "\n") {
		line := ""
		for _, word := range strings.Fields(para) {
			switch {
			case line == "":
				line = word
			case len([]rune(line))+1+len([]rune(word)) <= width:
				line += " " + word
			default:
				lines = append(lines, line)
				line = word
			}
		}
		lines = append(lines, line)
	}
	return lines
}

// flagHelp is a help table of fs's flags, each written --name ARG as
// every sluice command takes them (Go's flag package accepts -name too).
// ARG is the flag's `quoted` name in its usage, else N, D or VALUE by its
// type; a default other than the zero value is added to the description.
func flagHelp(fs *flag.FlagSet) string {
	var rows [][2]string
	fs.VisitAll(func(f *flag.Flag) {
		arg, text := flag.UnquoteUsage(f)
		switch arg {
		case "int", "uint", "float":
			arg = "N"
		case "duration":
			arg = "D"
		case "string", "value":
			arg = "VALUE"
		default:
			arg = strings.ToUpper(arg)
		}
		term := "--" + f.Name
		if arg != "" {
			term += " " + arg
		}
		if !zeroDefault(f) {
			text += fmt.Sprintf(" (default %s)", f.DefValue)
		}
		rows = append(rows, [2]string{term, text})
	})
	return helpTable(rows...)
}

// zeroDefault reports whether a flag's default is its type's zero value
// (not worth printing).
func zeroDefault(f *flag.Flag) bool {
	switch f.DefValue {
	case "", "0", "false", "0s", "[]":
		return true
	}
	return false
}
