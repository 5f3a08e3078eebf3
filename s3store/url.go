package s3store

import (
	"fmt"
	"net/url"
	"os"
	"strings"
)

// ParseURL reads a store URL in the form Nix gives its own S3 stores:
//
//	s3://BUCKET[/PREFIX][?endpoint=ENDPOINT&region=REGION&scheme=http|https&profile=PROFILE]
//
// ENDPOINT is host[:port] or a URL (its scheme then chooses https or not).
// What the URL leaves out comes from the environment the AWS tools read:
// AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_REGION or
// AWS_DEFAULT_REGION, AWS_PROFILE; with no endpoint anywhere, AWS's own
// (s3.REGION.amazonaws.com, https). The URL never carries keys: they come
// from Config.AccessKey, the environment or the credentials file.
func ParseURL(raw string) (Config, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return Config{}, fmt.Errorf("store %q: %w", raw, err)
	}
	if u.Scheme != "s3" {
		return Config{}, fmt.Errorf("store %q: want s3://BUCKET/PREFIX", raw)
	}
	if u.User != nil {
		return Config{}, fmt.Errorf("store %q: keys do not go in the URL; use the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or a credentials file", redact(u))
	}
	if u.Host == "" {
		return Config{}, fmt.Errorf("store %q: no bucket", raw)
	}
	cfg := Config{Bucket: u.Host, Prefix: strings.Trim(u.Path, "/"), Secure: true}
	q := u.Query()
	for k := range q {
		switch k {
		case "endpoint", "region", "scheme", "profile":
		default:
			return Config{}, fmt.Errorf("store %q: unknown parameter %q (want endpoint, region, scheme or profile)", raw, k)
		}
	}
	endpoint := firstOf(q.Get("endpoint"), os.Getenv("AWS_ENDPOINT_URL_S3"), os.Getenv("AWS_ENDPOINT_URL"))
	cfg.Region = firstOf(q.Get("region"), os.Getenv("AWS_REGION"), os.Getenv("AWS_DEFAULT_REGION"))
	cfg.Profile = q.Get("profile")
	if err := cfg.SetEndpoint(endpoint); err != nil {
		return Config{}, fmt.Errorf("store %q: %w", raw, err)
	}
	switch q.Get("scheme") {
	case "":
	case "http":
		cfg.Secure = false
	case "https":
		cfg.Secure = true
	default:
		return Config{}, fmt.Errorf("store %q: scheme %q: want http or https", raw, q.Get("scheme"))
	}
	return cfg, nil
}

// SetEndpoint sets Endpoint (and Secure, when e has a scheme) from e:
// host[:port], http://host[:port] or https://host[:port]. An empty e
// means AWS's endpoint for the region.
func (c *Config) SetEndpoint(e string) error {
	if e == "" {
		c.Endpoint = "s3.amazonaws.com"
		if c.Region != "" {
			c.Endpoint = "s3." + c.Region + ".amazonaws.com"
		}
		c.Secure = true
		return nil
	}
	if strings.Contains(e, "://") {
		u, err := url.Parse(e)
		if err != nil {
			return fmt.Errorf("endpoint %q: %w", e, err)
		}
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" || u.User != nil {
			return fmt.Errorf("endpoint %q: want host[:port] or http(s)://host[:port]", e)
		}
		c.Endpoint, c.Secure = u.Host, u.Scheme == "https"
		return nil
	}
	if strings.ContainsAny(e, "/?#@") {
		return fmt.Errorf("endpoint %q: want host[:port] or http(s)://host[:port]", e)
	}
	c.Endpoint = e
	return nil
}

// String is the store's URL without secrets, for logs and errors.
func (c Config) String() string {
	u := url.URL{Scheme: "s3", Host: c.Bucket, Path: "/" + strings.Trim(c.Prefix, "/")}
	scheme := "http"
	if c.Secure {
		scheme = "https"
	}
	u.RawQuery = url.Values{"endpoint": {scheme + "://" + c.Endpoint}}.Encode()
	if c.Region != "" {
		u.RawQuery += "&region=" + url.QueryEscape(c.Region)
	}
	return u.String()
}

func redact(u *url.URL) string {
	v := *u
	v.User = nil
	return v.String()
}

func firstOf(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}
