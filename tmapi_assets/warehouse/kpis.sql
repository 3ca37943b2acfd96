-- KPIs per (item, spec) for the items in temp table kpi_scope(item_id, spec_id).
-- Windows end at the item's newest stored date (not "today"), so a KPI never moves unless data does.
-- Price change reference: price_min on the latest date at least N days before the newest price date;
-- when history is shorter than N days, the oldest stored price.
WITH
scope AS (SELECT DISTINCT item_id, spec_id FROM kpi_scope),
sales AS (
    SELECT s.* FROM tmapi.sales_trend_daily s SEMI JOIN scope USING (item_id, spec_id)
),
prices AS (
    SELECT p.* FROM tmapi.price_trend_daily p SEMI JOIN scope USING (item_id, spec_id)
    WHERE p.price_min IS NOT NULL
),
sales_end AS (
    SELECT item_id, spec_id, max(date) AS last_sales_date, count(*) AS history_days
    FROM sales GROUP BY item_id, spec_id
),
price_end AS (
    SELECT item_id, spec_id, max(date) AS last_price_date FROM prices GROUP BY item_id, spec_id
),
sales_kpis AS (
    SELECT
        s.item_id, s.spec_id,
        sum(s.sales_quantity) FILTER (WHERE s.date > e.last_sales_date - 7)  AS units_7d,
        sum(s.sales_quantity) FILTER (WHERE s.date > e.last_sales_date - 30) AS units_30d,
        sum(s.order_quantity) FILTER (WHERE s.date > e.last_sales_date - 30) AS orders_30d,
        count(*) FILTER (WHERE s.date > e.last_sales_date - 30 AND s.sales_quantity = 0) AS zero_sales_days_30d
    FROM sales s JOIN sales_end e USING (item_id, spec_id)
    GROUP BY s.item_id, s.spec_id
),
price_kpis AS (
    SELECT
        p.item_id, p.spec_id,
        arg_max(p.price_min, p.date) AS latest_price_min,
        arg_max(p.price_max, p.date) AS latest_price_max,
        coalesce(arg_max(p.price_min, p.date) FILTER (WHERE p.date <= e.last_price_date - 7),
                 arg_min(p.price_min, p.date)) AS reference_price_7d,
        coalesce(arg_max(p.price_min, p.date) FILTER (WHERE p.date <= e.last_price_date - 30),
                 arg_min(p.price_min, p.date)) AS reference_price_30d,
        min(p.price_min) AS lowest_price_min,
        first(p.date ORDER BY p.price_min ASC, p.date DESC) AS lowest_price_date
    FROM prices p JOIN price_end e USING (item_id, spec_id)
    GROUP BY p.item_id, p.spec_id
)
SELECT
    scope.item_id,
    scope.spec_id,
    greatest(se.last_sales_date, pe.last_price_date)                    AS last_observed_date,
    sk.units_7d,
    sk.units_30d,
    sk.orders_30d,
    CAST(sk.units_30d AS DECIMAL(18, 4)) / nullif(sk.orders_30d, 0)    AS units_per_order_30d,
    pk.latest_price_min,
    pk.latest_price_max,
    CAST(100 * (pk.latest_price_min - pk.reference_price_7d) / nullif(pk.reference_price_7d, 0) AS DECIMAL(18, 4))
                                                                         AS price_change_pct_7d,
    CAST(100 * (pk.latest_price_min - pk.reference_price_30d) / nullif(pk.reference_price_30d, 0) AS DECIMAL(18, 4))
                                                                         AS price_change_pct_30d,
    pk.lowest_price_min,
    pk.lowest_price_date,
    sk.zero_sales_days_30d,
    date_diff('day', CAST(timezone('Asia/Shanghai', st.publish_time) AS DATE),
              greatest(se.last_sales_date, pe.last_price_date))        AS days_since_publish,
    coalesce(se.history_days, 0)                                         AS history_days,
    now()                                                                AS computed_at
FROM scope
LEFT JOIN sales_end  se USING (item_id, spec_id)
LEFT JOIN price_end  pe USING (item_id, spec_id)
LEFT JOIN sales_kpis sk USING (item_id, spec_id)
LEFT JOIN price_kpis pk USING (item_id, spec_id)
LEFT JOIN tmapi.item_statistics st USING (item_id, spec_id)
