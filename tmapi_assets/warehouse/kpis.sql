-- KPIs per (item, spec) for the items in temp table kpi_scope(item_id, spec_id).
-- Windows end at the item's newest stored date (not "today"), so a KPI never moves unless data does.
-- Price change reference: price_min on the latest date at least N days before the newest price date;
-- when history is shorter than N days, the oldest stored price.
-- Only the last 31 days of each trend are read: what needs all history (days stored, date bounds, the lowest price)
-- is in tmapi.item_history, kept up to date by every load, so this costs the same after a year as after a month.
-- An item whose priced days are contiguous has a price on every day from first_price_date to last_price_date, so its
-- reference is the price on greatest(first_price_date, last_price_date - N), inside the window; an item with a gap
-- gets its references from kpi_gap_references (Warehouse._refresh_kpis, from all its rows).
-- {in_scope} is empty when every item is in scope (Warehouse.refresh_kpis).
WITH
scope AS (SELECT DISTINCT item_id, spec_id FROM kpi_scope),
history AS (SELECT * FROM tmapi.item_history {in_scope}),
sales_kpis AS (  -- only the last 30 days of each item reach the aggregate
    SELECT
        s.item_id, s.spec_id,
        sum(s.sales_quantity) FILTER (WHERE s.date > h.last_sales_date - 7) AS units_7d,
        sum(s.sales_quantity)                                              AS units_30d,
        sum(s.order_quantity)                                              AS orders_30d,
        count(*) FILTER (WHERE s.sales_quantity = 0)                       AS zero_sales_days_30d
    FROM tmapi.sales_trend_daily s
    JOIN history h ON s.item_id = h.item_id AND s.spec_id = h.spec_id AND s.date > h.last_sales_date - 30
    GROUP BY s.item_id, s.spec_id
),
price_kpis AS (  -- the last 31 priced days
    SELECT
        p.item_id, p.spec_id,
        max(p.price_min) FILTER (WHERE p.date = h.last_price_date)                                  AS latest_price_min,
        max(p.price_max) FILTER (WHERE p.date = h.last_price_date)                                  AS latest_price_max,
        max(p.price_min) FILTER (WHERE p.date = greatest(h.first_price_date, h.last_price_date - 7))  AS reference_7d,
        max(p.price_min) FILTER (WHERE p.date = greatest(h.first_price_date, h.last_price_date - 30)) AS reference_30d
    FROM tmapi.price_trend_daily p
    JOIN history h ON p.item_id = h.item_id AND p.spec_id = h.spec_id AND p.date >= h.last_price_date - 30
    WHERE p.price_min IS NOT NULL
    GROUP BY p.item_id, p.spec_id
),
reference AS (
    SELECT pk.item_id, pk.spec_id,
           CASE WHEN g.item_id IS NULL THEN pk.reference_7d ELSE g.reference_price_7d END   AS price_7d,
           CASE WHEN g.item_id IS NULL THEN pk.reference_30d ELSE g.reference_price_30d END AS price_30d
    FROM price_kpis pk LEFT JOIN kpi_gap_references g USING (item_id, spec_id)
)
SELECT
    scope.item_id,
    scope.spec_id,
    greatest(h.last_sales_date, h.last_price_date)                       AS last_observed_date,
    sk.units_7d,
    sk.units_30d,
    sk.orders_30d,
    CAST(sk.units_30d AS DECIMAL(18, 4)) / nullif(sk.orders_30d, 0)    AS units_per_order_30d,
    pk.latest_price_min,
    pk.latest_price_max,
    CAST(100 * (pk.latest_price_min - r.price_7d) / nullif(r.price_7d, 0) AS DECIMAL(18, 4))
                                                                         AS price_change_pct_7d,
    CAST(100 * (pk.latest_price_min - r.price_30d) / nullif(r.price_30d, 0) AS DECIMAL(18, 4))
                                                                         AS price_change_pct_30d,
    h.lowest_price_min,
    h.lowest_price_date,
    sk.zero_sales_days_30d,
    date_diff('day', CAST(timezone('Asia/Shanghai', st.publish_time) AS DATE),
              greatest(h.last_sales_date, h.last_price_date))          AS days_since_publish,
    coalesce(h.sales_days, 0)                                            AS history_days,
    now()                                                                AS computed_at
FROM scope
LEFT JOIN history    h  USING (item_id, spec_id)
LEFT JOIN sales_kpis sk USING (item_id, spec_id)
LEFT JOIN price_kpis pk USING (item_id, spec_id)
LEFT JOIN reference  r  USING (item_id, spec_id)
LEFT JOIN tmapi.item_statistics st USING (item_id, spec_id)
