//! The function registry and `ContextProvider` handed to DataFusion's SQL planner.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow_schema::DataType;
use datafusion_common::config::ConfigOptions;
use datafusion_common::{plan_err, Result as DfResult, TableReference};
use datafusion_expr::planner::{ContextProvider, ExprPlanner};
use datafusion_expr::{AggregateUDF, HigherOrderUDF, ScalarUDF, TableSource, WindowUDF};

/// Functions from DataFusion's library that make no sense on an unbounded
/// stream: they depend on a query start time (which the simplifier would
/// freeze at compile time) or on a source file.
const EXCLUDED: &[&str] =
    &["now", "current_timestamp", "current_date", "current_time", "input_file_name", "file_row_index"];

/// Whether `name` is one of the functions deliberately left out.
pub(crate) fn is_excluded_function(name: &str) -> bool {
    EXCLUDED.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Every scalar function and expression planner Weir expressions can use.
#[derive(Debug)]
pub(crate) struct Registry {
    /// Lower-case name or alias -> function.
    udfs: HashMap<String, Arc<ScalarUDF>>,
    /// Primary names, sorted, for error suggestions.
    names: Vec<String>,
    planners: Vec<Arc<dyn ExprPlanner>>,
    options: Arc<ConfigOptions>,
}

/// The process-wide registry, built on first use.
pub(crate) static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

impl Registry {
    fn new() -> Self {
        let mut udfs = HashMap::new();
        let mut names = Vec::new();
        let all = datafusion_functions::all_default_functions()
            .into_iter()
            .chain(datafusion_functions_nested::all_default_nested_functions());
        for udf in all {
            let excluded = std::iter::once(udf.name())
                .chain(udf.aliases().iter().map(String::as_str))
                .any(|n| EXCLUDED.contains(&n));
            if excluded {
                continue;
            }
            names.push(udf.name().to_string());
            for alias in udf.aliases() {
                udfs.entry(alias.to_ascii_lowercase()).or_insert_with(|| Arc::clone(&udf));
            }
            udfs.insert(udf.name().to_ascii_lowercase(), udf);
        }
        names.sort();
        names.dedup();

        // Same planners, in the same order, as a default DataFusion session.
        let planners: Vec<Arc<dyn ExprPlanner>> = vec![
            Arc::new(datafusion_functions::core::planner::CoreFunctionPlanner::default()),
            Arc::new(datafusion_functions_nested::planner::NestedFunctionPlanner),
            Arc::new(datafusion_functions_nested::planner::FieldAccessPlanner),
            Arc::new(datafusion_functions::datetime::planner::DatetimeFunctionPlanner),
            Arc::new(datafusion_functions::unicode::planner::UnicodeFunctionPlanner),
        ];

        Self { udfs, names, planners, options: Arc::new(ConfigOptions::default()) }
    }

    /// Shared configuration (used by the simplifier too).
    pub(crate) fn config(&self) -> &Arc<ConfigOptions> {
        &self.options
    }

    /// Sorted primary names of all available scalar functions.
    pub(crate) fn function_names(&self) -> &[String] {
        &self.names
    }
}

impl ContextProvider for Registry {
    fn get_table_source(&self, name: TableReference) -> DfResult<Arc<dyn TableSource>> {
        plan_err!("tables are not available in expressions (found `{name}`)")
    }

    fn get_expr_planners(&self) -> &[Arc<dyn ExprPlanner>] {
        &self.planners
    }

    fn get_function_meta(&self, name: &str) -> Option<Arc<ScalarUDF>> {
        self.udfs.get(name).or_else(|| self.udfs.get(&name.to_ascii_lowercase())).cloned()
    }

    fn get_higher_order_meta(&self, _name: &str) -> Option<Arc<HigherOrderUDF>> {
        None
    }

    fn get_aggregate_meta(&self, _name: &str) -> Option<Arc<AggregateUDF>> {
        None
    }

    fn get_window_meta(&self, _name: &str) -> Option<Arc<WindowUDF>> {
        None
    }

    fn get_variable_type(&self, _variable_names: &[String]) -> Option<DataType> {
        None
    }

    fn options(&self) -> &ConfigOptions {
        &self.options
    }

    fn udf_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn higher_order_function_names(&self) -> Vec<String> {
        Vec::new()
    }

    fn udaf_names(&self) -> Vec<String> {
        Vec::new()
    }

    fn udwf_names(&self) -> Vec<String> {
        Vec::new()
    }
}
