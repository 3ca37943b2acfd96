-- The warehouse schema: THE one place where tables are defined. Idempotent: run on every write connection.
-- Conventions: spec_id '' means "the item as a whole" (never NULL, so it can be part of a key);
-- `date` columns are China dates (Asia/Shanghai) exactly as the API sends them; prices are DECIMAL;
-- *_at columns are instants (TIMESTAMPTZ, shown in the session's TimeZone; DuckDB stores UTC).
CREATE SCHEMA IF NOT EXISTS tmapi;

-- Every HTTP attempt, verbatim, append-only, written before anything is parsed. It doubles as the cost ledger:
-- one row per paid call (network errors included, http_status NULL).
CREATE TABLE IF NOT EXISTS tmapi.raw_responses (
    response_id   VARCHAR PRIMARY KEY,        -- uuid made by the pipeline; makes re-loading a spool idempotent
    run_id        VARCHAR,                    -- Dagster run id (or 'cli-…')
    item_id       BIGINT NOT NULL,
    spec_id       VARCHAR NOT NULL,
    attempt       INTEGER NOT NULL,           -- 1-based attempt number within the run
    fetched_at    TIMESTAMPTZ NOT NULL,
    elapsed_ms    DOUBLE,
    http_status   INTEGER,                    -- NULL: no HTTP answer (timeout, reset)
    api_code      INTEGER,                    -- body `code`, NULL if absent
    outcome       VARCHAR NOT NULL,           -- see errors.Outcome
    message       VARCHAR,                    -- the API's msg / gateway message / network error (token-free)
    request_url   VARCHAR NOT NULL,           -- without the token
    body          VARCHAR,                    -- the body as UTF-8 text (invalid bytes replaced)
    body_bytes    BLOB,                       -- the exact bytes, kept only when body is not valid UTF-8
    body_size     BIGINT NOT NULL
);

-- The latest successful observation per (item, spec).
CREATE TABLE IF NOT EXISTS tmapi.item_statistics (
    item_id                          BIGINT NOT NULL,
    spec_id                          VARCHAR NOT NULL,
    has_data                         BOOLEAN NOT NULL,   -- false: the API answered data = null (no statistics)
    publish_time                     TIMESTAMPTZ,        -- the API's China-time string, as an instant
    sales_quantity_30days            BIGINT,
    sales_quantity_total_raw         VARCHAR,
    sales_quantity_total_lower_bound BIGINT,
    sales_quantity_total_is_lower_bound BOOLEAN,
    order_quantity_total_raw         VARCHAR,
    order_quantity_total_lower_bound BIGINT,
    order_quantity_total_is_lower_bound BOOLEAN,
    sales_rows                       INTEGER NOT NULL,
    price_rows                       INTEGER NOT NULL,
    duplicate_dates                  INTEGER NOT NULL,
    sum30_observed                   BIGINT,             -- Σ daily sales over the last 30 rows
    sum30_ok                         BOOLEAN,            -- sum30_observed = sales_quantity_30days (NULL: unknown)
    response_id                      VARCHAR NOT NULL,   -- the raw_responses row this reflects
    fetched_at                       TIMESTAMPTZ NOT NULL,
    updated_at                       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (item_id, spec_id)
);

-- Daily history, grown past the API's 30-day window by upserts keyed on (item, spec, date).
CREATE TABLE IF NOT EXISTS tmapi.sales_trend_daily (
    item_id         BIGINT NOT NULL,
    spec_id         VARCHAR NOT NULL,
    date            DATE NOT NULL,
    sales_quantity  BIGINT,                   -- pieces sold that day
    order_quantity  BIGINT,                   -- orders that day
    fetched_at      TIMESTAMPTZ NOT NULL,     -- of the response the values come from (the newest wins)
    PRIMARY KEY (item_id, spec_id, date)
);

CREATE TABLE IF NOT EXISTS tmapi.price_trend_daily (
    item_id     BIGINT NOT NULL,
    spec_id     VARCHAR NOT NULL,
    date        DATE NOT NULL,
    price_min   DECIMAL(18, 4),
    price_max   DECIMAL(18, 4),
    fetched_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (item_id, spec_id, date)
);

-- Per (item, spec) facts over ALL stored daily history, kept up to date by every load in the same transaction as the
-- trend rows it describes (warehouse._HISTORY_MERGE_SQL), so the KPIs read only the last 31 days of each trend and
-- their cost does not grow with the history kept. Rebuilt from the trend tables by `tmapi-assets reparse`.
CREATE TABLE IF NOT EXISTS tmapi.item_history (
    item_id            BIGINT NOT NULL,
    spec_id            VARCHAR NOT NULL,
    sales_days         INTEGER NOT NULL,      -- rows in sales_trend_daily
    first_sales_date   DATE,
    last_sales_date    DATE,
    price_days         INTEGER NOT NULL,      -- rows in price_trend_daily with a price_min
    first_price_date   DATE,                  -- of those rows
    last_price_date    DATE,
    lowest_price_min   DECIMAL(18, 4),
    lowest_price_date  DATE,                  -- most recent day at that lowest price
    PRIMARY KEY (item_id, spec_id)
);

-- Derived per (item, spec); recomputed in SQL (see kpis.sql) after each load.
CREATE TABLE IF NOT EXISTS tmapi.item_kpis (
    item_id                 BIGINT NOT NULL,
    spec_id                 VARCHAR NOT NULL,
    last_observed_date      DATE,             -- newest sales or price date; the 7/30-day windows end here
    units_7d                BIGINT,
    units_30d               BIGINT,
    orders_30d              BIGINT,
    units_per_order_30d     DECIMAL(18, 4),
    latest_price_min        DECIMAL(18, 4),
    latest_price_max        DECIMAL(18, 4),
    price_change_pct_7d     DECIMAL(18, 4),   -- latest price_min vs price_min 7 days earlier, in %
    price_change_pct_30d    DECIMAL(18, 4),
    lowest_price_min        DECIMAL(18, 4),   -- over all stored history
    lowest_price_date       DATE,             -- most recent day at that lowest price
    zero_sales_days_30d     INTEGER,          -- days with 0 sales in the 30-day window
    days_since_publish      INTEGER,          -- last_observed_date − publish date (China dates)
    history_days            INTEGER,          -- sales days stored so far
    computed_at             TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (item_id, spec_id)
);

-- Sales and price joined on date (never by position).
CREATE OR REPLACE VIEW tmapi.item_daily AS
SELECT
    coalesce(s.item_id, p.item_id) AS item_id,
    coalesce(s.spec_id, p.spec_id) AS spec_id,
    coalesce(s.date, p.date)       AS date,
    s.sales_quantity,
    s.order_quantity,
    p.price_min,
    p.price_max
FROM sales_trend_daily s  -- unqualified: a view resolves names in its own schema, whatever the catalog is called
FULL OUTER JOIN price_trend_daily p
    ON s.item_id = p.item_id AND s.spec_id = p.spec_id AND s.date = p.date;

-- The cost ledger: paid calls per China day, item and outcome.
CREATE OR REPLACE VIEW tmapi.api_calls_daily AS
SELECT
    CAST(timezone('Asia/Shanghai', fetched_at) AS DATE) AS call_date_cn,
    item_id,
    spec_id,
    outcome,
    count(*)                AS calls,
    count(DISTINCT run_id)  AS runs
FROM raw_responses
GROUP BY ALL;
